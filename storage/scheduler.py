"""The scheduler's claim: a worker pulls the best runnable job for itself.

Order: highest priority first, then fair share between teams (the team that used
the fewest worker-seconds over a recent window, then the fewest runs), then age.
A team's ``max_running`` is enforced here. PostgreSQL locks the chosen row with
``FOR UPDATE SKIP LOCKED`` (and the team row when it has a limit); SQLite takes
the database's write lock first, so claims there run one at a time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from quantfarm.errors import InvalidState
from storage.jobs import JobStatus, transition
from storage.models import Job, JobRun, Team, utcnow

log = logging.getLogger(__name__)

FAIR_SHARE_WINDOW = 24 * 3600.0
_QUEUED = JobStatus.QUEUED.value


def claim_next(s: Session, owner: str, lease_seconds: float, *, only: str | None = None,
               window_seconds: float = FAIR_SHARE_WINDOW, memory: int | None = None) -> Job | None:
    """Claim the best runnable job for ``owner`` (only ``only`` when given); None when there is none.

    ``memory``: the worker's bytes; jobs estimated bigger are left for a bigger worker.
    """
    fits = [] if memory is None else [or_(Job.memory_estimate.is_(None), Job.memory_estimate <= memory)]
    for _ in range(3):
        try:
            return _claim_once(s, owner, lease_seconds, only, window_seconds, fits)
        except InvalidState:  # the row moved between our read and our write (rolled back): look again
            log.info("claim by %s raced another move; looking again", owner)
    return None


def _claim_once(s: Session, owner: str, lease_seconds: float, only: str | None, window: float, fits: list) -> Job | None:
    postgres = s.get_bind().dialect.name == "postgresql"
    if not postgres:
        # A no-op write as the transaction's first statement takes SQLite's write lock until commit.
        s.execute(text("UPDATE jobs SET id = id WHERE 0"))
    groups = _queued_groups(s, only, fits)
    if not groups:
        return None
    teams = {g[0] for g in groups}
    usage = team_usage(s, window, teams)
    limits = dict(s.execute(select(Team.id, Team.max_running).where(Team.id.in_(teams), Team.max_running.is_not(None))).all())
    for team_id, priority, _oldest in sorted(groups, key=lambda g: (-g[1], usage[g[0]], g[2])):
        if team_id in limits and not _under_limit(s, team_id, limits[team_id], postgres):
            continue
        stmt = (select(Job).where(Job.status == _QUEUED, Job.team_id == team_id, Job.priority == priority, *fits)
                .order_by(Job.created_at, Job.id).limit(1).with_for_update(skip_locked=True))
        if only is not None:
            stmt = stmt.where(Job.id == only)
        job = s.scalars(stmt.execution_options(populate_existing=True)).first()
        if job is not None:
            return transition(s, job, JobStatus.RUNNING, take=(owner, lease_seconds))
    return None


def _queued_groups(s: Session, only: str | None, fits: list) -> list[tuple[str, int, datetime]]:
    """(team, priority, oldest created_at) of every queued group of jobs this worker can take."""
    stmt = (select(Job.team_id, Job.priority, func.min(Job.created_at)).where(Job.status == _QUEUED, *fits)
            .group_by(Job.team_id, Job.priority))
    if only is not None:
        stmt = stmt.where(Job.id == only)
    return [tuple(r) for r in s.execute(stmt).all()]


def _under_limit(s: Session, team_id: str, limit: int, postgres: bool) -> bool:
    """Whether the team runs fewer than ``limit`` jobs (PostgreSQL: holding its row until commit)."""
    if postgres:  # two claimers of one limited team take turns here, so both cannot pass a limit of one
        s.execute(select(Team.id).where(Team.id == team_id).with_for_update())
    running = s.scalar(select(func.count()).select_from(Job).where(Job.team_id == team_id, Job.status == JobStatus.RUNNING.value))
    return running < limit


def team_usage(s: Session, window_seconds: float, teams: set[str] | None = None) -> dict[str, tuple[float, int]]:
    """Each team's (worker-seconds, runs) over the last ``window_seconds``; running claims count up to now."""
    now = utcnow()
    start = now - timedelta(seconds=window_seconds)
    stmt = select(JobRun.team_id, JobRun.started_at, JobRun.ended_at).where(or_(JobRun.ended_at.is_(None), JobRun.ended_at > start))
    if teams is not None:
        stmt = stmt.where(JobRun.team_id.in_(teams))
    seconds: dict[str, float] = defaultdict(float)
    runs: dict[str, int] = defaultdict(int)
    for team_id, began, ended in s.execute(stmt).all():
        seconds[team_id] += max(0.0, ((ended or now) - max(began, start)).total_seconds())
        runs[team_id] += 1
    return defaultdict(lambda: (0.0, 0), {t: (seconds[t], runs[t]) for t in seconds})
