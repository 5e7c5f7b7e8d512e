"""An idle worker looks for work in the database itself, every ``worker_poll_seconds``.

A broker message is only a wake-up: the claim reads the database. Wake-ups die
with a restarted broker (Redis keeps no queue across a crash), and one sent while
the broker was down never existed, so a worker that waited only for messages
would sit idle beside queued jobs. The poller claims and runs them on its own
thread; ``JobRunner.drain`` lets one caller at a time run jobs, so a wake-up
that arrives meanwhile waits and then looks for more.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Poller:
    """Run ``runner.drain`` every ``interval`` seconds (and once at start) while the worker is idle."""

    def __init__(self, runner, interval: float):
        self.runner, self.interval = runner, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-poller", daemon=True)

    def poll_once(self) -> list[tuple[str, str]]:
        """One look (skipped while a wake-up drains or the worker stops); the jobs it ran."""
        if self.runner.preempting:
            return []
        try:
            ran = self.runner.drain(wait=False)
        except Exception:  # the database is away longer than the runner's retries: look again next time
            log.warning("worker %s: could not look for work", self.runner.owner, exc_info=True)
            return []
        if ran:
            log.info("found waiting work by polling; ran %s", ran)
        return ran

    def _loop(self) -> None:
        while True:
            self.poll_once()
            if self._stop.wait(self.interval):
                return

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop looking; a job running on our thread hands itself back at its next boundary (``preempting``)."""
        self.runner.preempting = True
        self._stop.set()
        self._thread.join()
