"""The job state machine: one ``transition()``, leases, and the sweeper's queries.

Every status change goes through ``transition()``, which checks the allowed-moves
table, applies the change as a compare-and-set on the row (so two processes can
never both move the same job), and appends a ``job_events`` row.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, insert, literal, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

from quantfarm.errors import InvalidState, LeaseLost, NotFound
from storage.lean import Fixed, kept_cursor
from storage.lean import wrapped as lean_error
from storage.models import Job, JobEvent, JobRun, Team, TeamQueued, new_id, utcnow


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Stage(str, enum.Enum):
    FETCHING = "fetching"
    CALIBRATING = "calibrating"
    EXPORTING = "exporting"
    EVALUATING = "evaluating"
    UPLOADING = "uploading"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    # running -> queued: requeued after its worker was lost (attempt + 1)
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    # failed/cancelled -> queued: an explicit retry, which resumes from checkpoints
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
}


# A team's queued jobs are counted in this many rows (storage.models.TeamQueued): each database backend adds to its own.
QUEUED_SLOTS = 64


@cache
def queued_move(dialect: str) -> Fixed:
    """The statement adding ``delta`` (+1: a job became queued, -1: one stopped being) to ``team_id``'s count."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert

        slot = func.mod(func.pg_backend_pid(), QUEUED_SLOTS)
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert

        slot = literal(0)  # one writer at a time
    stmt = upsert(TeamQueued).values(team_id=bindparam("team_id"), slot=slot, queued=bindparam("delta"))
    return Fixed(stmt.on_conflict_do_update(index_elements=[TeamQueued.team_id, TeamQueued.slot],
                                            set_={"queued": TeamQueued.queued + stmt.excluded.queued}))


def count_queued(conn: Connection, team_id: str, delta: int) -> None:
    """Add ``delta`` to the team's queued jobs (in ``conn``'s transaction: with the move it counts)."""
    queued_move(conn.dialect.name).run(conn, {"team_id": team_id, "delta": delta})


def add_event(s: Session, job_id: str, kind: str, *, message: str | None = None, **fields: Any) -> JobEvent:
    ev = JobEvent(job_id=job_id, kind=kind, message=message, at=utcnow(), data=fields.pop("data", None) or {}, **fields)
    s.add(ev)
    return ev


@dataclass(frozen=True)
class Lease:
    """Who holds a running job, and the claim (fencing token) it was given; None: any claim."""

    owner: str
    claim: int | None = None


def db_now(s: Session) -> ColumnElement:
    """The database clock as naive UTC (leases are judged by it, never by a worker's clock)."""
    return db_later(s, 0.0)


def db_later(s: Session, seconds: float) -> ColumnElement:
    """The database clock plus ``seconds``, as naive UTC in the column's stored form."""
    if s.get_bind().dialect.name == "sqlite":
        # SQLAlchemy stores 'YYYY-MM-DD HH:MM:SS.ffffff'; %f gives milliseconds, so pad to micro.
        return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{float(seconds):+.3f} seconds").op("||")("000")
    now = func.timezone("UTC", func.clock_timestamp())
    return now + func.make_interval(0, 0, 0, 0, 0, 0, float(seconds)) if seconds else now


def _held(stmt, lease: Lease):
    stmt = stmt.where(Job.status == JobStatus.RUNNING.value, Job.lease_owner == lease.owner)
    return stmt if lease.claim is None else stmt.where(Job.claim == lease.claim)


def _holds(job: Job, lease: Lease) -> bool:
    return job.status == JobStatus.RUNNING.value and job.lease_owner == lease.owner and lease.claim in (None, job.claim)


def owned_update(s: Session, job_id: str, lease: Lease, **values: Any) -> None:
    """Update a running job only while ``lease`` still holds it; raise LeaseLost otherwise."""
    stmt = _held(update(Job).where(Job.id == job_id), lease)
    res = s.execute(stmt.values(**values).execution_options(synchronize_session=False))
    if res.rowcount != 1:
        raise LeaseLost(f"Job {job_id} is no longer held by {lease.owner} (claim {lease.claim}).")


def check_fence(s: Session, job_id: str, lease: Lease) -> None:
    """Raise LeaseLost unless ``lease`` still holds the job (before a write outside the DB)."""
    owned_update(s, job_id, lease, updated_at=utcnow())


def transition(
    s: Session,
    job: Job,
    to: JobStatus,
    *,
    owner: str | None = None,
    lease: Lease | None = None,
    take: tuple[str, float] | None = None,
    expired: bool = False,
    message: str | None = None,
    data: dict[str, Any] | None = None,
    actor: str | None = None,
    **changes: Any,
) -> Job:
    """Move ``job`` to ``to`` if the table allows it and nobody moved it first.

    ``lease`` (or just ``owner``) must still hold the job; ``take=(owner, seconds)``
    claims a queued job (the claim counter rises); ``expired`` requires the lease
    to have run out by the database clock (the sweeper). Raises InvalidState for a
    move the table forbids or a row changed under us, LeaseLost when the lease is gone.
    """
    frm = JobStatus(job.status)
    lease = lease or (Lease(owner) if owner is not None else None)
    if lease is not None and not _holds(job, lease):
        raise LeaseLost(f"Job {job.id} is no longer held by {lease.owner} (claim {lease.claim}).")
    if to not in ALLOWED[frm]:
        raise InvalidState(
            f"Job {job.id} is {frm.value}; it cannot become {to.value}.",
            details={"status": frm.value, "wanted": to.value},
        )
    if (to == JobStatus.RUNNING) != (take is not None):
        raise ValueError("a job becomes running only by a claim (take=(owner, lease_seconds))")
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now, **changes}
    if take is not None:
        values.update(claim=Job.claim + 1, lease_owner=take[0], lease_expires_at=db_later(s, take[1]),
                      started_at=now, finished_at=None)
    if to in TERMINAL or to == JobStatus.QUEUED:
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    if to in TERMINAL:
        values.setdefault("finished_at", now)
    stmt = update(Job).where(Job.id == job.id, Job.status == frm.value)
    if lease is not None:
        stmt = _held(stmt, lease)
    if expired:
        stmt = stmt.where(Job.claim == job.claim, Job.lease_expires_at < db_now(s))
    claim_before = job.claim
    # RETURNING refreshes ``job`` in the same round trip (no second SELECT).
    moved = s.execute(stmt.values(**values).returning(Job)
                      .execution_options(synchronize_session=False, populate_existing=True)).scalars().all()
    if len(moved) != 1:
        s.rollback()
        if lease is not None:
            raise LeaseLost(f"Job {job.id} is no longer held by {lease.owner} (claim {lease.claim}).")
        raise InvalidState(f"Job {job.id} changed while it was being updated; try again.")
    if (frm == JobStatus.QUEUED) != (to == JobStatus.QUEUED):
        count_queued(s.connection(), job.team_id, 1 if to == JobStatus.QUEUED else -1)
    if frm == JobStatus.RUNNING:
        s.execute(update(JobRun).where(JobRun.job_id == job.id, JobRun.claim == claim_before, JobRun.ended_at.is_(None))
                  .values(ended_at=now, outcome=to.value).execution_options(synchronize_session=False))
    if take is not None:
        s.add(JobRun(job_id=job.id, team_id=job.team_id, claim=job.claim, owner=take[0], started_at=now))
        data = {"owner": take[0], "attempt": job.attempt, "claim": job.claim, **(data or {})}
        message = message or f"Claimed by {take[0]}"
    add_event(s, job.id, "status", from_status=frm.value, to_status=to.value, message=message, data=data, actor=actor)
    s.flush()
    if to in TERMINAL:
        _notify_ended(s, job)
    return job


def _notify_ended(s: Session, job: Job) -> None:
    """Queue the job's webhooks in this transaction; send them once it commits."""
    from storage.db import after_commit
    from storage.views import job_view
    from storage.webhooks import create_deliveries

    ids = create_deliveries(s, job, job_view(job))
    notify = s.info.get("notify_webhook")
    for delivery_id in ids if notify else ():
        after_commit(s, lambda d=delivery_id: _safe_notify(notify, d))


def _safe_notify(notify, delivery_id: str) -> None:
    try:
        notify(delivery_id)
    except Exception:  # broker down: the sweeper re-sends due deliveries
        logging.getLogger(__name__).exception("could not enqueue webhook delivery %s", delivery_id)


def get_job(s: Session, job_id: str, *, lock: bool = False, team_id: str | None = None) -> Job:
    """Return the job or raise NotFound (also for another team's job when ``team_id`` is given)."""
    stmt = select(Job).where(Job.id == job_id)
    if team_id is not None:
        stmt = stmt.where(Job.team_id == team_id)
    if lock:
        stmt = stmt.with_for_update()
    job = s.scalars(stmt).one_or_none()
    if job is None:
        raise NotFound(f"No job with id {job_id!r}.", details={"resource": "job", "id": job_id})
    return job


def new_job_values(*, method: str, model_ref: str, spec: dict, secrets: dict, priority: int, team_id: str,
                   created_by: str | None, memory_estimate: int | None) -> dict[str, Any]:
    """A queued job's row, every column a view reads included."""
    now = utcnow()
    return {"id": new_id("job"), "team_id": team_id, "created_by": created_by, "status": JobStatus.QUEUED.value,
            "stage": None, "method": method, "model_ref": model_ref[:500], "spec": spec, "secrets": secrets,
            "priority": priority, "memory_estimate": memory_estimate, "attempt": 1, "claim": 0, "cancel_requested": False,
            "metrics": {}, "created_at": now, "updated_at": now, "enqueued_at": now}


def _created_event(job: dict[str, Any]) -> dict[str, Any]:
    return {"job_id": job["id"], "kind": "status", "from_status": None, "to_status": JobStatus.QUEUED.value, "stage": None,
            "message": "Job created", "data": {}, "actor": job["created_by"], "at": job["created_at"]}


def create_job(s: Session, *, method: str, model_ref: str, spec: dict, secrets: dict, priority: int = 0,
               team_id: str | None = None, created_by: str | None = None, memory_estimate: int | None = None) -> Job:
    """Insert a queued job and its 'created' event as ORM objects (the caller commits, then enqueues).

    ``team_id`` None puts the job in the default team (the local admin's). The API's
    submit uses ``insert_job`` (the same rows, no ORM flush).
    """
    from storage.teams import ensure_default_team

    values = new_job_values(method=method, model_ref=model_ref, spec=spec, secrets=secrets, priority=priority,
                            team_id=team_id or ensure_default_team(s), created_by=created_by, memory_estimate=memory_estimate)
    job = Job(**values)
    s.add(job)
    s.add(JobEvent(**_created_event(values)))
    s.flush()  # one flush for both rows
    count_queued(s.connection(), job.team_id, 1)
    return job


# The columns new_job_values and _created_event fill, in their order.
_JOB_KEYS = ("id", "team_id", "created_by", "status", "stage", "method", "model_ref", "spec", "secrets", "priority",
             "memory_estimate", "attempt", "claim", "cancel_requested", "metrics", "created_at", "updated_at", "enqueued_at")
_EVENT_KEYS = ("job_id", "kind", "from_status", "to_status", "stage", "message", "data", "actor", "at")
_INSERT_JOB = Fixed(insert(Job.__table__), keys=_JOB_KEYS)
_INSERT_EVENT = Fixed(insert(JobEvent.__table__), keys=_EVENT_KEYS)

# A team's limit of queued jobs (its own max_queued, else the farm's) and its counted queued jobs, in one statement.
_QUOTA = Fixed(select(
    func.coalesce(select(Team.max_queued).where(Team.id == bindparam("team_id")).scalar_subquery(), bindparam("farm_limit")),
    select(func.coalesce(func.sum(TeamQueued.queued), 0)).where(TeamQueued.team_id == bindparam("team_id")).scalar_subquery()))


def queued_quota(conn: Connection, team_id: str, farm_limit: int) -> tuple[int, int]:
    """(the team's limit of queued jobs, its queued jobs as counted): one statement, a sum over a few rows."""
    [(limit, counted)] = _QUOTA.rows(conn, {"team_id": team_id, "farm_limit": farm_limit})
    return limit, counted


# A batch of submits (api/submits.py): each job's own columns and their types, and its team's limit (the rest are the
# same for every new job: see ``new_job_values`` and ``_created_event``; a test compares the rows with insert_job's).
_BATCH_COLUMNS = (("id", "varchar"), ("team_id", "varchar"), ("created_by", "varchar"), ("method", "varchar"),
                  ("model_ref", "varchar"), ("spec", "json"), ("secrets", "json"), ("priority", "integer"),
                  ("memory_estimate", "bigint"), ("created_at", "timestamp"), ("farm_limit", "bigint"))
# PostgreSQL: the jobs of a JSON array (``batch_row``'s objects, in order), their events and their teams' counts in
# one statement, each job stored only while its team has fewer queued jobs than its limit, counting the batch's own
# earlier jobs of that team (``nth``); it returns the ids stored (over the quota, nothing of that job is stored).
# One fixed text and one parameter, whatever the batch's size: psycopg converts it once and prepares it (PostgreSQL
# plans it once a connection). A json value is reproduced exactly from its text (json_to_record): the same text as
# the single INSERT's json.dumps of it.
_BATCH_SQL = f"""WITH input AS (
    SELECT r.*, e.ord FROM json_array_elements(%s::json) WITH ORDINALITY AS e(job, ord),
        json_to_record(e.job) AS r({", ".join(f"{name} {kind}" for name, kind in _BATCH_COLUMNS)})),
numbered AS (SELECT input.*, row_number() OVER (PARTITION BY team_id ORDER BY ord) AS nth FROM input),
ok AS (SELECT * FROM numbered n WHERE
    (SELECT coalesce(sum(q.queued), 0) FROM team_queued q WHERE q.team_id = n.team_id) + n.nth
    <= coalesce((SELECT t.max_queued FROM teams t WHERE t.id = n.team_id), n.farm_limit)),
job AS (INSERT INTO jobs (id, team_id, created_by, status, stage, method, model_ref, spec, secrets, priority, memory_estimate,
                          attempt, claim, cancel_requested, metrics, created_at, updated_at, enqueued_at)
    SELECT id, team_id, created_by, '{JobStatus.QUEUED.value}', NULL, method, model_ref, spec, secrets, priority, memory_estimate,
           1, 0, false, '{{}}'::json, created_at, created_at, created_at FROM ok ORDER BY ord
    RETURNING id, team_id),
event AS (INSERT INTO job_events (job_id, kind, from_status, to_status, stage, message, data, actor, at)
    SELECT ok.id, 'status', NULL, '{JobStatus.QUEUED.value}', NULL, 'Job created', '{{}}'::json, ok.created_by, ok.created_at
    FROM ok JOIN job ON job.id = ok.id ORDER BY ok.ord),
counted AS (INSERT INTO team_queued (team_id, slot, queued)
    SELECT team_id, mod(pg_backend_pid(), {QUEUED_SLOTS}), count(*) FROM job GROUP BY team_id
    ON CONFLICT (team_id, slot) DO UPDATE SET queued = team_queued.queued + excluded.queued)
SELECT id FROM job"""
_BATCH_KEYS = tuple(name for name, _ in _BATCH_COLUMNS[:-1])


def batch_row(dialect, values: dict[str, Any], farm_limit: int) -> str:
    """One job of ``insert_jobs`` (``values``: ``new_job_values``) as its JSON object, each column's own processing
    done (the secrets' encryption, UTC times): in the submitting thread, so a job that cannot be bound fails alone."""
    row: dict[str, Any] = {}
    for key, kind in _batch_types():
        value = values[key]
        if kind is not None:
            value = kind.process_bind_param(value, dialect)
        row[key] = value.isoformat() if isinstance(value, datetime) else value
    row["farm_limit"] = farm_limit
    return json.dumps(row)


@cache
def _batch_types() -> tuple[tuple[str, TypeDecorator | None], ...]:
    """Each of ``_BATCH_KEYS`` with its column's type where that processes a bound value (looked up once)."""
    cols = Job.__table__.c
    return tuple((key, cols[key].type if isinstance(cols[key].type, TypeDecorator) else None) for key in _BATCH_KEYS)


def insert_jobs(db, rows: list[str]) -> set[str]:
    """PostgreSQL: store the jobs of ``rows`` (``batch_row``'s) within their teams' quotas, with their events and counts,
    in one statement on an autocommit connection (its own transaction: every job or none); return the ids stored.

    Within one statement the quota is exact, several jobs of one team included (each counts the team's queued
    jobs as counted, plus the batch's jobs of that team before it). The statement's error is raised as
    SQLAlchemy's would be (storage/lean.py).
    """
    batch = f"[{','.join(rows)}]"
    with db.held_read() as conn:  # the process's connection used last: a warm backend
        dbapi_conn = conn.connection.dbapi_connection
        try:
            cur = kept_cursor(conn)
            cur.execute(_BATCH_SQL, (batch,))
            return {id_ for (id_,) in cur.fetchall()}
        except conn.dialect.loaded_dbapi.Error as err:
            raise lean_error(conn, dbapi_conn, err, _BATCH_SQL, {}) from err


def insert_job(db, *, method: str, model_ref: str, spec: dict, secrets: dict, priority: int, team_id: str,
               created_by: str | None, memory_estimate: int | None, quota: int | None = None) -> dict[str, Any] | None:
    """Insert a queued job, its 'created' event and its team's count, committed together; return the row.

    The row (a dict) carries every column storage.views.job_view reads; the caller
    enqueues after this. Fixed INSERTs (storage/lean.py): an ORM flush of the
    same two objects cost a submit about a third of its CPU, and a session's BEGIN,
    two INSERTs and COMMIT were four round trips where PostgreSQL now takes one
    (``Database.write_together``).

    ``quota`` (the farm's limit of queued jobs a team; a team's own ``max_queued``
    comes first): store the job only while its team has fewer queued jobs than
    that, read on PostgreSQL in the same statement as the writes (``insert_jobs``
    of one job), so a submit is one round trip; None when over it (nothing stored).
    """
    values = new_job_values(method=method, model_ref=model_ref, spec=spec, secrets=secrets, priority=priority,
                            team_id=team_id, created_by=created_by, memory_estimate=memory_estimate)
    if quota is not None and db.engine.dialect.name == "postgresql":  # one statement, its own transaction
        return values if insert_jobs(db, [batch_row(db.reader.dialect, values, quota)]) else None
    if quota is not None:  # SQLite (one writer at a time): read, then write
        with db.connect_read() as conn:
            limit, counted = queued_quota(conn, team_id, quota)
        if counted >= limit:
            return None
    db.write_together([(_INSERT_JOB, values), (_INSERT_EVENT, _created_event(values)),
                       (queued_move(db.engine.dialect.name), {"team_id": team_id, "delta": 1})])
    return values


def claim(s: Session, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Take this queued job for ``owner`` (tests and tools; workers use scheduler.claim_next)."""
    from storage.scheduler import claim_next

    return claim_next(s, owner, lease_seconds, only=job_id)


def heartbeat(s: Session, job_id: str, owner: str | Lease, lease_seconds: float) -> bool:
    """Extend the lease (by the database clock); return whether a cancel was requested.

    Raises LeaseLost when the job is no longer running under ``owner``.
    """
    lease = owner if isinstance(owner, Lease) else Lease(owner)
    owned_update(s, job_id, lease, lease_expires_at=db_later(s, lease_seconds))
    return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_stage(s: Session, job_id: str, owner: str | Lease, stage: Stage, message: str | None = None) -> None:
    lease = owner if isinstance(owner, Lease) else Lease(owner)
    owned_update(s, job_id, lease, stage=stage.value, updated_at=utcnow())
    add_event(s, job_id, "stage", stage=stage.value, message=message or f"Stage: {stage.value}")


def set_progress(
    s: Session, job_id: str, owner: str | Lease, *, done: int, total: int, eta: float | None, data: dict | None = None
) -> None:
    lease = owner if isinstance(owner, Lease) else Lease(owner)
    owned_update(s, job_id, lease, layers_done=done, layers_total=total, eta_seconds=eta, updated_at=utcnow())
    add_event(s, job_id, "progress", message=f"Layer {done} of {total}", data={"layers_done": done, "layers_total": total, "eta_seconds": eta, **(data or {})})


def request_cancel(s: Session, job_id: str, *, team_id: str | None = None, actor: str | None = None) -> Job:
    """Cancel a queued job at once, or flag a running one (its worker stops it within seconds, in any stage)."""
    job = get_job(s, job_id, team_id=team_id)
    status = JobStatus(job.status)
    if status == JobStatus.QUEUED:
        return transition(s, job, JobStatus.CANCELLED, message="Cancelled before it started", actor=actor, stage=None)
    if status == JobStatus.RUNNING:
        if not job.cancel_requested:
            # Guarded on the status: a job that ends between the read and this write keeps its end.
            res = s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                            .values(cancel_requested=True, updated_at=utcnow()).execution_options(synchronize_session=False))
            if res.rowcount != 1:
                s.refresh(job)
                raise InvalidState(f"Job {job_id} is {job.status}; only queued or running jobs can be cancelled.", details={"status": job.status})
            add_event(s, job_id, "status", message="Cancel requested; the job stops within seconds",
                      data={"cancel_requested": True}, actor=actor)
            s.flush()
            s.refresh(job)
        return job
    raise InvalidState(f"Job {job_id} is {status.value}; only queued or running jobs can be cancelled.", details={"status": status.value})


def retry(s: Session, job_id: str, *, team_id: str | None = None, actor: str | None = None,
          retry_window_days: float | None = None) -> Job:
    """Queue a failed or cancelled job again; it resumes from its checkpoints.

    Refused (409 retry_window_passed) once the job's retry window has passed.
    """
    from storage.retention import check_retryable

    job = get_job(s, job_id, team_id=team_id)
    status = JobStatus(job.status)
    if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise InvalidState(f"Job {job_id} is {status.value}; only failed or cancelled jobs can be retried.", details={"status": status.value})
    check_retryable(job, retry_window_days)
    return transition(
        s, job, JobStatus.QUEUED, message="Retry requested", actor=actor,
        attempt=job.attempt + 1, error_code=None, error_message=None, cancel_requested=False,
        finished_at=None, stage=None, enqueued_at=utcnow(),
    )


def expired_leases(s: Session) -> list[str]:
    """Ids of running jobs whose lease has run out by the database clock."""
    return list(s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < db_now(s))))


def requeue_lost(s: Session, job: Job, max_attempts: int) -> JobStatus:
    """Handle a running job whose lease expired: requeue, cancel, or fail it.

    Every move is a compare-and-set on the claim read and on the lease still being
    expired by the database clock: a lease renewed an instant ago wins (InvalidState).
    """
    if job.cancel_requested:
        transition(s, job, JobStatus.CANCELLED, expired=True, message="Worker lost while cancelling", stage=None)
        return JobStatus.CANCELLED
    if job.attempt >= max_attempts:
        transition(
            s, job, JobStatus.FAILED, expired=True, message="Worker lost too many times",
            error_code="worker_lost", stage=None,
            error_message=f"The job's worker stopped responding on all {job.attempt} attempts; retry it or check the workers' logs.",
        )
        return JobStatus.FAILED
    transition(
        s, job, JobStatus.QUEUED, expired=True, message=f"Lease of {job.lease_owner} expired; requeued",
        data={"previous_owner": job.lease_owner}, attempt=job.attempt + 1, stage=None, enqueued_at=utcnow(),
    )
    return JobStatus.QUEUED


def give_up_stalled(s: Session, job: Job, lease: Lease, max_attempts: int, quiet_seconds: float) -> JobStatus:
    """Requeue a stalled job spending an attempt, or fail it `stalled` on its last one (fenced by ``lease``)."""
    why = f"No progress for {quiet_seconds:.0f}s though the worker's heartbeat ran"
    if job.attempt >= max_attempts:
        transition(s, job, JobStatus.FAILED, lease=lease, message=why, error_code="stalled", stage=None,
                   error_message=f"{why}, on all {job.attempt} attempts; retry it or check the worker's logs.")
        return JobStatus.FAILED
    transition(s, job, JobStatus.QUEUED, lease=lease, message=f"{why}; requeued", data={"stalled": True, "previous_owner": lease.owner},
               attempt=job.attempt + 1, stage=None, enqueued_at=utcnow())
    return JobStatus.QUEUED


def release(s: Session, job: Job, lease: Lease, reason: str, *, why: str = "preempted") -> Job:
    """Hand a running job back to the queue at once, without spending an attempt (preempted, handed on)."""
    return transition(s, job, JobStatus.QUEUED, lease=lease, message=reason,
                      data={"previous_owner": lease.owner, why: True}, stage=None, enqueued_at=utcnow())


def oldest_waiting(s: Session, older_than: float) -> list[str]:
    """Ids of queued jobs waiting longer than ``older_than`` seconds, oldest first (the same time: in the order made)."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    return list(s.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.enqueued_at < cutoff)
                          .order_by(Job.enqueued_at, Job.id).limit(100)))
