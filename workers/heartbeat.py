"""A background thread that keeps a job's lease alive and notices cancel requests."""

from __future__ import annotations

import contextvars
import logging
import threading

from quantfarm.errors import LeaseLost
from storage import jobs
from storage.db import Database

log = logging.getLogger(__name__)


class Heartbeat:
    """Renew ``owner``'s lease every ``interval`` seconds until stopped.

    The layer loop also renews at every layer boundary; this thread covers
    layers that take longer than a lease.
    """

    def __init__(self, db: Database, job_id: str, owner: str, lease_seconds: float, interval: float):
        self.db, self.job_id, self.owner = db, job_id, owner
        self.lease_seconds, self.interval = lease_seconds, interval
        self.cancel_requested = False
        self.lost = False
        self._stop = threading.Event()
        ctx = contextvars.copy_context()  # its log lines name the job, like the runner's
        self._thread = threading.Thread(target=ctx.run, args=(self._loop,), name=f"heartbeat-{job_id}", daemon=True)

    def beat(self) -> None:
        """Renew now; raise LeaseLost if another worker owns the job."""
        cancel = self.db.run(lambda s: jobs.heartbeat(s, self.job_id, self.owner, self.lease_seconds), what=f"job {self.job_id} heartbeat")
        self.cancel_requested = cancel or self.cancel_requested

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except LeaseLost:
                self.lost = True
                log.warning("job %s: lease lost; stopping at the next layer boundary", self.job_id)
                return
            except Exception:  # a DB hiccup must not kill the thread; the next beat retries
                log.exception("job %s: heartbeat failed", self.job_id)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
