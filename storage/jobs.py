"""The job state machine: one ``transition()``, leases, and the sweeper's queries.

Every status change goes through ``transition()``, which checks the allowed-moves
table, applies the change as a compare-and-set on the row (so two processes can
never both move the same job), and appends a ``job_events`` row.
"""

from __future__ import annotations

import enum
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from quantfarm.errors import InvalidState, LeaseLost, NotFound
from storage.models import Job, JobEvent, new_id, utcnow


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


def add_event(s: Session, job_id: str, kind: str, *, message: str | None = None, **fields: Any) -> JobEvent:
    ev = JobEvent(job_id=job_id, kind=kind, message=message, at=utcnow(), data=fields.pop("data", None) or {}, **fields)
    s.add(ev)
    return ev


def transition(
    s: Session,
    job: Job,
    to: JobStatus,
    *,
    owner: str | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
    actor: str | None = None,
    **changes: Any,
) -> Job:
    """Move ``job`` to ``to`` if the table allows it and nobody moved it first.

    ``owner``, when given, must still hold the lease. Raises InvalidState for a
    move the table forbids or a row changed under us, LeaseLost when ``owner``
    no longer holds the job.
    """
    frm = JobStatus(job.status)
    if to not in ALLOWED[frm]:
        raise InvalidState(
            f"Job {job.id} is {frm.value}; it cannot become {to.value}.",
            details={"status": frm.value, "wanted": to.value},
        )
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now, **changes}
    if to in TERMINAL:
        values.setdefault("finished_at", now)
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    stmt = update(Job).where(Job.id == job.id, Job.status == frm.value)
    if owner is not None:
        stmt = stmt.where(Job.lease_owner == owner)
    res = s.execute(stmt.values(**values).execution_options(synchronize_session=False))
    if res.rowcount != 1:
        s.rollback()
        if owner is not None:
            raise LeaseLost(f"Job {job.id} is no longer held by {owner}.")
        raise InvalidState(f"Job {job.id} changed while it was being updated; try again.")
    add_event(s, job.id, "status", from_status=frm.value, to_status=to.value, message=message, data=data, actor=actor)
    s.flush()
    s.refresh(job)
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


def create_job(s: Session, *, method: str, model_ref: str, spec: dict, secrets: dict, priority: int = 0,
               team_id: str | None = None, created_by: str | None = None) -> Job:
    """Insert a queued job and its 'created' event (the caller commits, then enqueues).

    ``team_id`` None puts the job in the default team (the local admin's).
    """
    from storage.teams import ensure_default_team

    now = utcnow()
    job = Job(
        id=new_id("job"),
        team_id=team_id or ensure_default_team(s),
        created_by=created_by,
        status=JobStatus.QUEUED.value,
        method=method,
        model_ref=model_ref[:500],
        spec=spec,
        secrets=secrets,
        priority=priority,
        attempt=1,
        metrics={},
        created_at=now,
        updated_at=now,
        enqueued_at=now,
    )
    s.add(job)
    s.flush()
    add_event(s, job.id, "status", to_status=JobStatus.QUEUED.value, message="Job created", actor=created_by)
    return job


def claim(s: Session, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Take a queued job for ``owner`` by compare-and-set; None if someone else has it."""
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            finished_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        s.rollback()
        return None
    job = s.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()
    add_event(
        s, job_id, "status", from_status=JobStatus.QUEUED.value, to_status=JobStatus.RUNNING.value,
        message=f"Claimed by {owner}", data={"owner": owner, "attempt": job.attempt},
    )
    return job


def heartbeat(s: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend ``owner``'s lease; return whether a cancel was requested.

    Raises LeaseLost when the job is no longer running under ``owner``.
    """
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise LeaseLost(f"Job {job_id} is no longer held by {owner}.")
    return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_stage(s: Session, job_id: str, owner: str, stage: Stage, message: str | None = None) -> None:
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
        .values(stage=stage.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise LeaseLost(f"Job {job_id} is no longer held by {owner}.")
    add_event(s, job_id, "stage", stage=stage.value, message=message or f"Stage: {stage.value}")


def set_progress(
    s: Session, job_id: str, owner: str, *, done: int, total: int, eta: float | None, data: dict | None = None
) -> None:
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
        .values(layers_done=done, layers_total=total, eta_seconds=eta, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise LeaseLost(f"Job {job_id} is no longer held by {owner}.")
    add_event(s, job_id, "progress", message=f"Layer {done} of {total}", data={"layers_done": done, "layers_total": total, "eta_seconds": eta, **(data or {})})


def request_cancel(s: Session, job_id: str, *, team_id: str | None = None, actor: str | None = None) -> Job:
    """Cancel a queued job at once, or flag a running one to stop at the next layer."""
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
            add_event(s, job_id, "status", message="Cancel requested; the job stops at the next layer boundary",
                      data={"cancel_requested": True}, actor=actor)
            s.flush()
            s.refresh(job)
        return job
    raise InvalidState(f"Job {job_id} is {status.value}; only queued or running jobs can be cancelled.", details={"status": status.value})


def retry(s: Session, job_id: str, *, team_id: str | None = None, actor: str | None = None) -> Job:
    """Queue a failed or cancelled job again; it resumes from its checkpoints."""
    job = get_job(s, job_id, team_id=team_id)
    status = JobStatus(job.status)
    if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise InvalidState(f"Job {job_id} is {status.value}; only failed or cancelled jobs can be retried.", details={"status": status.value})
    return transition(
        s, job, JobStatus.QUEUED, message="Retry requested", actor=actor,
        attempt=job.attempt + 1, error_code=None, error_message=None, cancel_requested=False,
        finished_at=None, stage=None, enqueued_at=utcnow(),
    )


def expired_leases(s: Session, now: datetime | None = None) -> list[Job]:
    now = now or utcnow()
    return list(s.scalars(select(Job).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)))


def requeue_lost(s: Session, job: Job, max_attempts: int) -> JobStatus:
    """Handle a running job whose lease expired: requeue, cancel, or fail it."""
    if job.cancel_requested:
        transition(s, job, JobStatus.CANCELLED, message="Worker lost while cancelling", stage=None)
        return JobStatus.CANCELLED
    if job.attempt >= max_attempts:
        transition(
            s, job, JobStatus.FAILED, message="Worker lost too many times",
            error_code="worker_lost",
            error_message=f"The job's worker stopped responding on all {job.attempt} attempts; retry it or check the workers' logs.",
        )
        return JobStatus.FAILED
    transition(
        s, job, JobStatus.QUEUED, message=f"Lease of {job.lease_owner} expired; requeued",
        data={"previous_owner": job.lease_owner}, attempt=job.attempt + 1,
        lease_owner=None, lease_expires_at=None, enqueued_at=utcnow(),
    )
    return JobStatus.QUEUED


def stale_queued(s: Session, older_than: float, now: datetime | None = None) -> list[Job]:
    """Queued jobs whose broker message may be lost (queued longer than ``older_than`` s)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than)
    return list(s.scalars(select(Job).where(Job.status == JobStatus.QUEUED.value, Job.enqueued_at < cutoff)))


def list_jobs(s: Session, *, status: str | None = None, limit: int = 50, cursor: str | None = None,
              team_id: str | None = None) -> tuple[list[Job], str | None]:
    """Return one page of jobs, newest first, and the cursor of the next page (one team's when given)."""
    stmt = select(Job).order_by(Job.id.desc()).limit(limit + 1)
    if team_id is not None:
        stmt = stmt.where(Job.team_id == team_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if cursor:
        stmt = stmt.where(Job.id < cursor)
    rows = list(s.scalars(stmt))
    nxt = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], nxt
