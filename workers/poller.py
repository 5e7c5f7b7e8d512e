"""An idle worker looks for work in the database itself: when the database announces new jobs, and every
``worker_poll_seconds``.

A broker message is only a wake-up: the claim reads the database. Wake-ups die
with a restarted broker (Redis keeps no queue across a crash), and one sent while
the broker was down never existed, so a worker that waited only for messages
would sit idle beside queued jobs. On PostgreSQL the submit sends no message at
all: every INSERT of jobs notifies a channel (storage/notices.py), and the
poller waits on it between looks, so a submitted job starts at once. The poller
claims and runs jobs on its own thread; ``JobRunner.drain`` lets one caller at a
time run jobs, so a wake-up that arrives meanwhile waits and then looks for more.
"""

from __future__ import annotations

import logging
import threading

from storage.notices import NewJobNotices, announces_new_jobs

log = logging.getLogger(__name__)

# While another caller drains, a look is skipped; the next comes this soon, not after the interval: a job stored as
# that drain found nothing more (its notice heard by this thread and spent on the skipped look) waits no longer.
BUSY_RETRY_SECONDS = 0.5


class Poller:
    """Run ``runner.drain`` once at start, at each notice of new jobs (PostgreSQL) and every ``interval`` seconds."""

    def __init__(self, runner, interval: float):
        self.runner, self.interval = runner, interval
        self._stop = threading.Event()
        self._skipped = False  # the last look found another caller draining
        self._thread = threading.Thread(target=self._loop, name="worker-poller", daemon=True)

    def poll_once(self, why: str = "polling") -> list[tuple[str, str]]:
        """One look (skipped while a wake-up drains or the worker stops); the jobs it ran."""
        self._skipped = False
        if self.runner.preempting:
            return []
        try:
            ran = self.runner.drain(wait=False)
        except Exception:  # the database is away longer than the runner's retries: look again next time
            log.warning("worker %s: could not look for work", self.runner.owner, exc_info=True)
            return []
        if ran is None:
            self._skipped = True
            return []
        if ran:
            log.info("found waiting work by %s; ran %s", why, ran)
        return ran

    def _loop(self) -> None:
        notices = NewJobNotices(self.runner.db) if announces_new_jobs(self.runner.db) else None
        why = "polling"
        try:
            while True:
                self.poll_once(why)
                wait = BUSY_RETRY_SECONDS if self._skipped else self.interval
                if notices is None:
                    heard = False
                    if self._stop.wait(wait):
                        return
                else:
                    heard = notices.wait(wait, self._stop)
                    if self._stop.is_set():
                        return
                why = "the database's notice of new jobs" if heard else "polling"
        finally:
            if notices is not None:
                notices.close()

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop looking; a job running on our thread hands itself back at its next boundary (``preempting``)."""
        self.runner.preempting = True
        self._stop.set()
        self._thread.join()
