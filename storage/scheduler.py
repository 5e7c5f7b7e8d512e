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
from datetime import timedelta

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session, aliased

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
    for _ in range(3):
        try:
            return _claim_once(s, owner, lease_seconds, only, window_seconds, memory)
        except InvalidState:  # the row moved between our read and our write (rolled back): look again
            log.info("claim by %s raced another move; looking again", owner)
    return None


def _claim_once(s: Session, owner: str, lease_seconds: float, only: str | None, window: float, memory: int | None) -> Job | None:
    postgres = s.get_bind().dialect.name == "postgresql"
    if not postgres:
        # A no-op write as the transaction's first statement takes SQLite's write lock until commit.
        s.execute(text("UPDATE jobs SET id = id WHERE 0"))
    candidates = _team_heads(s, only, memory)
    if not candidates:
        return None
    teams = {c.team_id for c in candidates}
    usage = team_usage(s, window, teams)
    limits = dict(s.execute(select(Team.id, Team.max_running).where(Team.id.in_(teams), Team.max_running.is_not(None))).all())
    for head in sorted(candidates, key=lambda c: (-c.priority, usage[c.team_id], c.created_at, c.id)):
        if head.team_id in limits and not _under_limit(s, head.team_id, limits[head.team_id], postgres):
            continue
        job = s.scalars(_best_of_team(head.team_id, only, memory).with_for_update(skip_locked=True)
                        .execution_options(populate_existing=True)).first()
        if job is not None:
            return transition(s, job, JobStatus.RUNNING, take=(owner, lease_seconds))
    return None


def _runnable(entity, team_id, only: str | None, memory: int | None) -> list:
    conds = [entity.status == _QUEUED, entity.team_id == team_id]
    if memory is not None:
        conds.append(or_(entity.memory_estimate.is_(None), entity.memory_estimate <= memory))
    if only is not None:
        conds.append(entity.id == only)
    return conds


def _best_of_team(team_id, only: str | None, memory: int | None):
    """The team's best queued job this worker can take: its highest priority, then its oldest.

    Two index probes on ix_jobs_queue (status, team_id, priority, created_at), never a sort of the queue.
    """
    other = aliased(Job)
    top = select(func.max(other.priority)).where(*_runnable(other, team_id, only, memory)).correlate_except(other).scalar_subquery()
    return (select(Job).where(*_runnable(Job, team_id, only, memory), Job.priority == top)
            .order_by(Job.created_at, Job.id).limit(1))


def _team_heads(s: Session, only: str | None, memory: int | None) -> list:
    """(id, team_id, priority, created_at) of each team's best queued job: index probes, not a scan of the queue."""
    head = _best_of_team(Team.id, only, memory).with_only_columns(Job.id).correlate(Team).scalar_subquery()
    heads = select(head).select_from(Team)
    return list(s.execute(select(Job.id, Job.team_id, Job.priority, Job.created_at).where(Job.id.in_(heads))))


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
