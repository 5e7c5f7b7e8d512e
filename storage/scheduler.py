"""The scheduler's claim: a worker pulls the best runnable job for itself.

Order: highest priority first, then fair share between teams (the team that used
the fewest worker-seconds over a recent window, then the fewest runs), then age.
A team's ``max_running`` is enforced here. One statement picks the job: each team's
best runnable job (index probes on ix_jobs_queue), full teams left out, ordered by
priority, the team's usage (computed in SQL from job_runs) and age, and locked with
``FOR UPDATE OF jobs SKIP LOCKED`` on PostgreSQL. A limited team's count is then
checked again with its row locked, and only when other claimers hold every head does
a team-by-team pass look past them. SQLite takes the database's write lock first, so
claims there run one at a time. With ``transition``'s UPDATE ... RETURNING a claim is
four statements on PostgreSQL (pick, update, job run, event).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, literal, or_, select, text
from sqlalchemy.orm import Session, aliased

from quantfarm.errors import InvalidState
from storage.jobs import JobStatus, transition
from storage.models import Job, JobRun, Team, UTCDateTime, utcnow

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
    passed_over: set[str] = set()  # limited teams found full once their row was locked
    while True:
        row = s.execute(_pick(s, only, memory, window, passed_over)).first()
        if row is None:  # nothing, or only heads other claimers hold: look past them, team by team
            return _claim_past_locked(s, owner, lease_seconds, only, memory, passed_over, postgres) if postgres else None
        job, limit = row
        if limit is not None and _full(s, job.team_id, postgres):
            passed_over.add(job.team_id)
            continue
        return transition(s, job, JobStatus.RUNNING, take=(owner, lease_seconds))


def _claim_past_locked(s: Session, owner: str, lease_seconds: float, only: str | None, memory: int | None,
                       passed_over: set[str], postgres: bool) -> Job | None:
    """Under contention: each team's best job not locked by another claimer (priority, then age)."""
    head = _best_of_team(Team.id, only, memory).with_only_columns(Job.id).correlate(Team).scalar_subquery()
    teams = s.execute(select(Job.team_id, Team.max_running).join(Team, Team.id == Job.team_id)
                      .where(Job.id.in_(select(head).select_from(Team))).order_by(Job.priority.desc(), Job.created_at)).all()
    for team_id, limit in teams:
        if team_id in passed_over or (limit is not None and _full(s, team_id, postgres)):
            continue
        job = s.scalars(_best_of_team(team_id, only, memory).with_for_update(skip_locked=True)
                        .execution_options(populate_existing=True)).first()
        if job is not None:
            return transition(s, job, JobStatus.RUNNING, take=(owner, lease_seconds))
    return None


def _pick(s: Session, only: str | None, memory: int | None, window: float, passed_over: set[str]):
    """One statement: each team's best runnable job, under its team's limit, ordered and locked.

    Priority first, then fair share (worker-seconds over ``window``, then runs), then age; on
    PostgreSQL ``FOR UPDATE OF jobs SKIP LOCKED``, so concurrent claimers take different rows.
    """
    head = _best_of_team(Team.id, only, memory).with_only_columns(Job.id).correlate(Team).scalar_subquery()
    heads = select(head).select_from(Team)
    if passed_over:
        heads = heads.where(Team.id.not_in(passed_over))
    limited = aliased(Team)
    running = aliased(Job)
    busy = (select(func.count()).select_from(running)
            .where(running.team_id == Job.team_id, running.status == JobStatus.RUNNING.value).correlate_except(running).scalar_subquery())
    full = select(limited.id).where(limited.id == Job.team_id, limited.max_running.is_not(None), busy >= limited.max_running).correlate_except(limited)
    used, count = _usage(s, Job.team_id, window)
    return (select(Job, Team.max_running).join(Team, Team.id == Job.team_id).where(Job.id.in_(heads), ~full.exists())
            .order_by(Job.priority.desc(), used, count, Job.created_at, Job.id).limit(1)
            .with_for_update(skip_locked=True, of=Job).execution_options(populate_existing=True))


def _seconds(s: Session, later, earlier):
    """``later - earlier`` in seconds, in SQL."""
    if s.get_bind().dialect.name == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


def _later(s: Session, a, b):
    return func.max(a, b) if s.get_bind().dialect.name == "sqlite" else func.greatest(a, b)


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


def _full(s: Session, team_id: str, postgres: bool) -> bool:
    """Whether a limited team runs its limit already, judged with its row locked (PostgreSQL).

    The pick left out teams it saw full; two claimers of one limited team take turns here,
    so both cannot pass a limit of one. Teams without a limit never get here.
    """
    stmt = select(Team.max_running).where(Team.id == team_id)
    limit = s.scalar(stmt.with_for_update() if postgres else stmt)
    running = s.scalar(select(func.count()).select_from(Job).where(Job.team_id == team_id, Job.status == JobStatus.RUNNING.value))
    return limit is not None and running >= limit


def _usage(s: Session, team_id, window_seconds: float):
    """SQL for a team's (worker-seconds, runs) over the last ``window_seconds``; running claims count up to now."""
    now = utcnow()
    start = now - timedelta(seconds=window_seconds)
    runs = (JobRun.team_id == team_id, or_(JobRun.ended_at.is_(None), JobRun.ended_at > start))
    used = select(func.coalesce(func.sum(_seconds(s, func.coalesce(JobRun.ended_at, literal(now, UTCDateTime)),
                                                   _later(s, JobRun.started_at, literal(start, UTCDateTime)))), 0.0)
                  ).where(*runs).scalar_subquery()
    return used, select(func.count()).select_from(JobRun).where(*runs).scalar_subquery()


def team_usage(s: Session, window_seconds: float) -> dict[str, tuple[float, int]]:
    """Each team's (worker-seconds, runs) over the last ``window_seconds``, as the claim weighs them."""
    used, count = _usage(s, Team.id, window_seconds)
    return {team_id: (float(sec), int(n)) for team_id, sec, n in s.execute(select(Team.id, used, count))}
