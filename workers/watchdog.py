"""Cancel anywhere and the stall watchdog.

The heartbeat thread notices a cancel request, a lost lease or a job whose progress
signals (stages, layers, ``JobRunner.progress()`` pulses) have not moved for
``QUANTFARM_STALL_SECONDS``, and interrupts the job's thread in whatever stage it is
(fetch, calibration, evaluation, export, upload) by raising an exception there at
its next Python bytecode. Code blocked inside one long C call is interrupted when
that call returns; a stalled job is requeued first (fenced), so it cannot write
anything meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

from quantfarm.errors import JobCancelled, LeaseLost
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)


class CancelledAnywhere(JobCancelled):
    """A cancel request interrupted the job mid-stage."""

    def __init__(self, message: str = "Cancelled while running; checkpoints kept for retry"):
        super().__init__(message)


class LostAnywhere(LeaseLost):
    """Another worker owns the job now: unwind at once."""

    def __init__(self, message: str = "Lease lost while running"):
        super().__init__(message)


class Stalled(Exception):
    """The watchdog requeued (or failed) the job: unwind at once, write nothing."""


class Interrupter:
    """Raise an exception in the job's thread from another thread, only while armed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tid: int | None = None
        self.fired: type[BaseException] | None = None

    def arm(self) -> None:
        with self._lock:
            self._tid, self.fired = threading.get_ident(), None

    def disarm(self) -> None:
        """Stop interrupting; drop an interrupt not delivered yet."""
        with self._lock:
            if self._tid is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._tid), None)
            self._tid = None

    def fire(self, exc_type: type[BaseException]) -> bool:
        """Interrupt the armed thread once (not the caller's own); return whether it was armed."""
        with self._lock:
            if self._tid is None or self.fired is not None or self._tid == threading.get_ident():
                return False
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._tid), ctypes.py_object(exc_type))
            self.fired = exc_type
            return True


class Watchdog(Heartbeat):
    """The job's heartbeat, which also interrupts the job on cancel, lost lease or stall."""

    def __init__(self, db, job_id, lease, lease_seconds, interval, *, runner):
        super().__init__(db, job_id, lease, lease_seconds, interval)
        self.runner = runner
        self._fetched = -1

    def beat(self) -> None:
        try:
            super().beat()
        except LeaseLost:
            self.runner.interrupter.fire(LostAnywhere)
            raise
        if self.cancel_requested:
            self.runner.interrupter.fire(CancelledAnywhere)
            return
        self._notice_fetch_bytes()
        if time.monotonic() - self.runner.last_progress > self.runner.settings.stall_seconds and threading.current_thread() is self._thread:
            self._stall()

    def _notice_fetch_bytes(self) -> None:
        """While fetching, bytes arriving in the scratch folder (or the model cache in it) are progress."""
        from storage.jobs import Stage

        if self.runner.stage != Stage.FETCHING or threading.current_thread() is not self._thread:
            return
        size = _bytes_under(self.runner.settings.resolved_scratch_dir)
        if size != self._fetched:
            self._fetched = size
            self.runner.progress()

    def _stall(self) -> None:
        quiet = time.monotonic() - self.runner.last_progress
        log.warning("job %s: no progress for %.0fs though its heartbeat runs; stalled", self.job_id, quiet)
        if self.runner.mark_stalled(self.job_id, quiet):
            self.runner.interrupter.fire(Stalled)
        self._stop.set()  # the job is no longer ours to renew


def _bytes_under(root) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # a temp file renamed or evicted meanwhile
                pass
    return total
