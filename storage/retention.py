"""Retention: the retry window, and garbage collection of what nobody can use any more.

While a failed or cancelled job can be retried (``QUANTFARM_RETRY_WINDOW`` days after
it ended) its checkpoints and encrypted secrets stay; after it both go and retry is
refused. A succeeded job loses its model and destination tokens at success and its
webhook signing secrets when the window ends. ``collect`` (``quantfarm gc`` and the
service's beat schedule) also removes old uploads, orphaned scratch folders, stale
claims' artifact files, old progress events and finished webhook deliveries. It
never deletes a succeeded job's artifact unless asked to.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from quantfarm.errors import InvalidState
from storage import farm, layout
from storage.jobs import TERMINAL, JobStatus, add_event
from storage.models import Artifact, Job, JobEvent, WebhookDelivery, utcnow

log = logging.getLogger(__name__)

RETRYABLE = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)
_FINAL_DELIVERIES = ("delivered", "failed", "disabled")


def webhook_secrets_only(secrets: dict[str, Any] | None) -> dict[str, Any]:
    """What a succeeded job keeps: its webhooks' signing secrets (deliveries can be replayed)."""
    return {k: v for k, v in (secrets or {}).items() if k.startswith("webhooks.")}


def erase_run_secrets(s: Session, job_id: str) -> None:
    """Drop a succeeded job's model and destination tokens (call after its success transition)."""
    job = s.get(Job, job_id)
    kept = webhook_secrets_only(job.secrets)
    if kept != (job.secrets or {}):
        s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.SUCCEEDED.value)
                  .values(secrets=kept).execution_options(synchronize_session=False))


def check_retryable(job: Job, window_days: float | None = None, now: datetime | None = None) -> None:
    """Raise InvalidState (409) when the job's retry window has passed or its state was purged."""
    ended = job.finished_at
    past = window_days is not None and ended is not None and ended < (now or utcnow()) - timedelta(days=window_days)
    if job.purged_at is not None or past:
        raise InvalidState(
            f"Job {job.id} ended {ended.date().isoformat() if ended else 'long ago'}, outside the retry window "
            f"({window_days if window_days is not None else 'QUANTFARM_RETRY_WINDOW'} days): its checkpoints and "
            "secrets are gone, so it cannot be retried. Submit it again as a new job.",
            code="retry_window_passed", details={"status": job.status, "finished_at": ended.isoformat() if ended else None},
        )


@dataclass
class GcAges:
    """How old each kind of thing must be before ``collect`` removes it."""

    retry_window_days: float
    uploads_days: float = 7.0
    scratch_hours: float = 24.0
    events_days: float = 90.0
    deliveries_days: float = 30.0
    artifacts_days: float | None = None  # succeeded jobs' artifacts: never, unless asked

    @classmethod
    def from_settings(cls, settings, artifacts_days: float | None = None) -> "GcAges":
        return cls(settings.retry_window, settings.gc_uploads_days, settings.gc_scratch_hours,
                   settings.gc_events_days, settings.gc_deliveries_days, artifacts_days)


@dataclass
class GcReport:
    purged_jobs: list[str] = field(default_factory=list)  # past the retry window: checkpoints and secrets gone
    uploads: list[str] = field(default_factory=list)
    scratch: list[str] = field(default_factory=list)
    stale_claims: list[str] = field(default_factory=list)  # artifact prefixes of claims that lost their job
    artifacts: list[str] = field(default_factory=list)
    events: int = 0
    deliveries: int = 0
    workers: int = 0  # rows of workers unseen for a day

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect(db, store, settings, ages: GcAges, now: datetime | None = None) -> GcReport:
    """Remove everything past its age; return what went."""
    now = now or utcnow()
    report = GcReport()
    report.purged_jobs = _purge_past_window(db, store, now - timedelta(days=ages.retry_window_days))
    report.uploads = _old_uploads(db, store, now - timedelta(days=ages.uploads_days))
    report.scratch = _orphaned_scratch(db, settings.resolved_scratch_dir, ages.scratch_hours * 3600)
    report.stale_claims = _stale_claims(db, store)
    if ages.artifacts_days is not None:
        report.artifacts = _old_artifacts(db, store, now - timedelta(days=ages.artifacts_days))
    with db.session() as s:
        report.events = s.execute(
            delete(JobEvent).where(JobEvent.at < now - timedelta(days=ages.events_days), JobEvent.kind != "status",
                                   JobEvent.job_id.in_(select(Job.id).where(Job.status.in_([t.value for t in TERMINAL]))))
        ).rowcount
        report.deliveries = s.execute(
            delete(WebhookDelivery).where(WebhookDelivery.status.in_(_FINAL_DELIVERIES),
                                          WebhookDelivery.created_at < now - timedelta(days=ages.deliveries_days))
        ).rowcount
        report.workers = farm.forget_dead(s, 24 * 3600.0)
    return report


def _purge_past_window(db, store, cutoff: datetime) -> list[str]:
    """Ended jobs past the retry window: delete checkpoints (failed/cancelled), erase secrets, mark purged."""
    with db.session() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_([t.value for t in TERMINAL]),
                                                  Job.finished_at < cutoff, Job.purged_at.is_(None))))
    done = []
    for job_id in ids:
        with db.session() as s:
            # Guarded: a job retried meanwhile is queued again and keeps everything.
            res = s.execute(update(Job).where(Job.id == job_id, Job.status.in_([t.value for t in TERMINAL]), Job.purged_at.is_(None))
                            .values(secrets={}, purged_at=utcnow()).execution_options(synchronize_session=False))
            if res.rowcount != 1:
                continue
            add_event(s, job_id, "log", message="Retry window ended: checkpoints and secrets erased")
        store.delete_prefix(layout.checkpoint_prefix(job_id))
        done.append(job_id)
    return done


def _referenced_uploads(s: Session) -> set[str]:
    """Uploads a job may still read: queued, running, or retryable jobs' calibration, model and gate task set."""
    specs = s.scalars(select(Job.spec).where(
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value, *RETRYABLE]), Job.purged_at.is_(None)))
    out = set()
    for spec in specs:
        for part, key in (("calibration", "upload_id"), ("model", "upload_id"), ("gate", "task_set_upload_id")):
            upload_id = ((spec or {}).get(part) or {}).get(key)
            if upload_id:
                out.add(upload_id)
    return out


def _old_uploads(db, store, cutoff: datetime) -> list[str]:
    with db.session() as s:
        keep = _referenced_uploads(s)
    gone = []
    for key in store.list("uploads/"):
        if not key.endswith("/" + layout.UPLOAD_META):
            continue
        upload_id = key.split("/")[1]
        try:
            created = datetime.fromisoformat(json.loads(store.get_bytes(key))["created_at"].replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            log.warning("upload %s: unreadable meta.json; left alone", upload_id)
            continue
        if created < cutoff and upload_id not in keep:
            store.delete_prefix(layout.upload_prefix(upload_id))
            gone.append(upload_id)
    return gone


def _orphaned_scratch(db, scratch_dir, max_age_seconds: float) -> list[str]:
    """Scratch folders of jobs not running (a killed worker's leftovers), untouched for ``max_age_seconds``."""
    if not scratch_dir.is_dir():
        return []
    with db.session() as s:
        running = set(s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value)))
    gone = []
    for folder in sorted(scratch_dir.iterdir()):
        if folder.is_dir() and folder.name not in running and time.time() - _newest_mtime(folder) > max_age_seconds:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
    return gone


def _newest_mtime(folder) -> float:
    newest = folder.stat().st_mtime
    for p in folder.rglob("*"):
        try:
            newest = max(newest, p.lstat().st_mtime)
        except OSError:
            pass
    return newest


def _stale_claims(db, store) -> list[str]:
    """Artifact files a superseded claim (a zombie) wrote under its own prefix, for jobs that have ended."""
    with db.session() as s:
        rows = s.execute(select(Job.id, Job.claim).where(Job.claim > 1, Job.status.in_([t.value for t in TERMINAL]))).all()
        kept = set(s.scalars(select(Artifact.store_prefix).where(Artifact.store_prefix.is_not(None))))
    gone = []
    for job_id, claim in rows:
        prefixes = {layout.artifact_prefix(job_id, c) for c in range(1, claim + 1)}
        for prefix in sorted(prefixes - kept):
            if store.list(prefix + "/"):
                store.delete_prefix(prefix)
                gone.append(prefix)
    return gone


def _old_artifacts(db, store, cutoff: datetime) -> list[str]:
    """Succeeded jobs' artifacts older than ``cutoff`` (only when asked): files and row go."""
    with db.session() as s:
        arts = [(a.id, a.job_id, layout.stored_prefix(a)) for a in s.scalars(select(Artifact).where(Artifact.created_at < cutoff))]
    for art_id, job_id, prefix in arts:
        store.delete_prefix(prefix)
        with db.session() as s:
            s.execute(delete(Artifact).where(Artifact.id == art_id))
            add_event(s, job_id, "log", message=f"Artifact {art_id} deleted by gc (older than asked)")
    return [a[0] for a in arts]
