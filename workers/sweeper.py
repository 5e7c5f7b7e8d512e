"""The sweeper: requeue jobs whose worker was lost, re-send lost messages.

Run by Celery beat in production and by its own loop (``python -m
workers.sweeper``) in the embedded stack.
"""

from __future__ import annotations

import logging
import signal
import threading
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
        return out

    def _enqueue(self, job_id: str) -> None:
        try:
            self.dispatcher.run_job(job_id)
        except Exception:  # broker down: the job stays queued and the next pass retries
            log.exception("job %s: could not enqueue", job_id)


def main() -> None:
    """Sweep every ``sweep_seconds`` until SIGTERM/SIGINT."""
    from workers.context import init_context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s sweeper %(levelname)s %(message)s")
    ctx = init_context(Settings())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("sweeper started (every %.1fs)", ctx.settings.sweep_seconds)
    while not stop.is_set():
        try:
            ctx.sweeper.sweep_once()
        except Exception:
            log.exception("sweep pass failed")
        stop.wait(ctx.settings.sweep_seconds)


if __name__ == "__main__":
    main()
