"""The sweeper: requeue jobs whose worker was lost, re-send lost messages.

Celery beat (inside the ``service`` worker) sends the sweep task every
``sweep_seconds``, in production and in the embedded stack alike.
"""

from __future__ import annotations

import logging
from datetime import datetime

from quantfarm.queue import Dispatcher
from quantfarm.settings import Settings
from storage import jobs
from storage.db import Database
from storage.jobs import JobStatus
from storage.models import utcnow

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, settings: Settings, db: Database, dispatcher: Dispatcher):
        self.settings, self.db, self.dispatcher = settings, db, dispatcher

    def sweep_once(self, now: datetime | None = None) -> dict[str, list[str]]:
        """One pass; return the ids it requeued, failed, cancelled and re-enqueued."""
        now = now or utcnow()
        out: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "reenqueued": []}
        with self.db.session() as s:
            expired = [j.id for j in jobs.expired_leases(s, now)]
        for job_id in expired:
            try:
                with self.db.session() as s:
                    job = jobs.get_job(s, job_id)
                    if job.status != JobStatus.RUNNING.value or job.lease_expires_at is None or job.lease_expires_at >= now:
                        continue  # renewed or finished meanwhile
                    result = jobs.requeue_lost(s, job, self.settings.max_attempts)
                out[{JobStatus.QUEUED: "requeued", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}[result]].append(job_id)
                if result == JobStatus.QUEUED:
                    self._enqueue(job_id)
                log.warning("job %s: lease expired; %s", job_id, result.value)
            except Exception:
                log.exception("job %s: sweep failed", job_id)
        with self.db.session() as s:
            stale = jobs.stale_queued(s, self.settings.requeue_queued_after_seconds, now)
            for job in stale:
                job.enqueued_at = now
        for job in stale:
            self._enqueue(job.id)
            out["reenqueued"].append(job.id)
        out["webhooks"] = self._resend_due_webhooks(now)
        return out

    def _resend_due_webhooks(self, now: datetime) -> list[str]:
        """Re-send deliveries whose next attempt is overdue (their countdown message was lost)."""
        from datetime import timedelta

        from storage.webhooks import due_deliveries

        with self.db.session() as s:
            due = due_deliveries(s, now - timedelta(seconds=max(30.0, self.settings.sweep_seconds * 3)))
        for delivery_id in due:
            try:
                self.dispatcher.deliver_webhook(delivery_id)
            except Exception:
                log.exception("webhook %s: could not enqueue", delivery_id)
        return due

    def _enqueue(self, job_id: str) -> None:
        try:
            self.dispatcher.run_job(job_id)
        except Exception:  # broker down: the job stays queued and the next pass retries
            log.exception("job %s: could not enqueue", job_id)
