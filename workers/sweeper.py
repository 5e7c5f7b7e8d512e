"""The sweeper: requeue jobs whose worker was lost, wake idle workers, re-send due webhooks.

Celery beat (inside the ``service`` worker) sends the sweep task every
``sweep_seconds``, in production and in the embedded stack alike.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from quantfarm.errors import InvalidState
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
        self._last_wakeup: float | None = None

    def sweep_once(self, now: datetime | None = None) -> dict[str, list[str]]:
        """One pass; return the ids it requeued, failed and cancelled, and the wake-ups it sent."""
        now = now or utcnow()
        out: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "woken": []}
        with self.db.session() as s:
            expired = jobs.expired_leases(s)
        for job_id in expired:
            try:
                result = self._requeue(job_id)
            except Exception:
                log.exception("job %s: sweep failed", job_id)
                continue
            if result is None:
                continue  # renewed, finished or taken meanwhile: the compare-and-set said no
            out[{JobStatus.QUEUED: "requeued", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}[result]].append(job_id)
            if result == JobStatus.QUEUED:
                self._enqueue(job_id)
            log.warning("job %s: lease expired; %s", job_id, result.value)
        out["woken"] = self._wake_for_waiting()
        out["webhooks"] = self._resend_due_webhooks(now)
        return out

    def _requeue(self, job_id: str) -> JobStatus | None:
        """Requeue, fail or cancel one expired job; None when its lease was renewed or it moved meanwhile."""
        try:
            with self.db.session() as s:
                job = jobs.get_job(s, job_id)
                if job.status != JobStatus.RUNNING.value:
                    return None
                return jobs.requeue_lost(s, job, self.settings.max_attempts)
        except InvalidState:
            return None

    def _wake_for_waiting(self) -> list[str]:
        """Send a few wake-ups when queued jobs have waited long (a lost message, idle workers).

        At most ``wakeup_batch`` per ``requeue_queued_after_seconds``, never one per queued job:
        a worker that wakes runs the best job and then looks for more by itself.
        """
        interval = self.settings.requeue_queued_after_seconds
        if self._last_wakeup is not None and time.monotonic() - self._last_wakeup < interval:
            return []
        with self.db.session() as s:
            waiting = jobs.oldest_waiting(s, interval)[: self.settings.wakeup_batch]
        if waiting:
            self._last_wakeup = time.monotonic()
        for job_id in waiting:
            self._enqueue(job_id)
        return waiting

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
