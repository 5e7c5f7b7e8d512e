"""A worker's row in the ``workers`` table: what it is, and a heartbeat saying it lives and what it runs."""

from __future__ import annotations

import logging
import os
import socket
import threading

from storage import farm
from storage.db import Database

log = logging.getLogger(__name__)


def detect_memory(device: str) -> tuple[str, int]:
    """(device name, bytes): the GPU's memory, or the machine's RAM for a CPU worker."""
    import torch

    from workers.engine.model import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return str(dev), int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    return "cpu", int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def capabilities() -> tuple[list[str], list[str], str]:
    """(methods, formats, engine version) this worker's engine implements."""
    from workers.engine import ENGINE_VERSION
    from workers.engine.methods import METHODS

    return sorted(METHODS), sorted({cls.format for cls in METHODS.values()}), ENGINE_VERSION


class Presence:
    """Register ``runner``'s worker and beat every ``interval`` seconds with its current job, until stopped."""

    def __init__(self, db: Database, runner, interval: float):
        self.db, self.runner, self.interval = db, runner, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-presence", daemon=True)

    def register(self) -> None:
        methods, formats, version = capabilities()
        with self.db.session() as s:
            farm.register(s, self.runner.owner, device=self.runner.device_name, memory_bytes=self.runner.memory,
                          methods=methods, formats=formats, engine_version=version, hostname=socket.gethostname())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.db.session() as s:
                    known = farm.beat(s, self.runner.owner, self.runner.current_job)
                if not known:  # forgotten by gc after a long stall: come back
                    self.register()
            except Exception:  # a DB hiccup must not kill the thread; the next beat retries
                log.exception("worker %s: presence beat failed", self.runner.owner)

    def start(self) -> "Presence":
        self.register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self.db.session() as s:
                farm.unregister(s, self.runner.owner)
        except Exception:
            log.warning("worker %s: could not unregister", self.runner.owner, exc_info=True)
