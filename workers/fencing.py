"""What the runner guards a job's writes and hand-backs with: the fenced store, the hand-back signals, the owner name."""

from __future__ import annotations

import errno
import os
import socket
import uuid
from pathlib import Path

from quantfarm.errors import LeaseLost
from quantfarm.store import BlobStore, PrefixedStore
from workers import metrics as worker_metrics
from workers.heartbeat import Heartbeat


def disk_full(exc: BaseException | None) -> bool:
    """Say whether ``exc`` (or what caused it) is a full disk, as OSError or as a library's message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Preempted(Exception):
    """The worker was asked to stop (SIGTERM): hand the job back without spending an attempt."""


class HandOn(Exception):
    """The job needs more memory than this worker has, but a bigger one exists: requeue it for that one."""


class FencedStore(PrefixedStore):
    """Writes under a prefix that stop as soon as the heartbeat knows the lease is gone; each is progress."""

    def __init__(self, inner: BlobStore, prefix: str, hb: Heartbeat, pulse=None):
        super().__init__(inner, prefix)
        self.hb, self.pulse = hb, pulse

    def put_file(self, key, path):
        self._check()
        super().put_file(key, path)
        worker_metrics.CHECKPOINT_BYTES.inc(Path(path).stat().st_size)
        self._pulse()

    def put_bytes(self, key, data):
        self._check()
        super().put_bytes(key, data)
        worker_metrics.CHECKPOINT_BYTES.inc(len(data))
        self._pulse()

    def _check(self) -> None:
        if self.hb.lost:
            raise LeaseLost(f"Job {self.hb.job_id}: lease lost; write refused")

    def _pulse(self) -> None:
        if self.pulse is not None:
            self.pulse()
