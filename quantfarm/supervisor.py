"""The embedded stack: API, one job worker and the service worker (sweeper + webhooks).

``quantfarm run`` starts them in the foreground. A child that dies is restarted
(a killed worker's job is requeued by the sweeper and resumes from its
checkpoints). One Ctrl-C or SIGTERM stops every child: SIGTERM first, SIGKILL
after a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantfarm.settings import Settings

log = logging.getLogger("quantfarm.run")

CHILDREN = {
    "api": ["-m", "api"],
    "worker": ["-m", "workers"],
    "service": ["-m", "workers", "service"],  # sweeper (beat) + webhook deliveries
}
GRACE_SECONDS = 10.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default=0.0)


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["QUANTFARM_HOME"] = str(settings.home.resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _start(child: Child, env: dict[str, str], run_dir: Path) -> None:
    # Own session: a terminal Ctrl-C reaches only us, and we stop the children in order.
    child.proc = subprocess.Popen([sys.executable, *child.argv], env=env, start_new_session=True)
    child.started = time.monotonic()
    (run_dir / f"{child.name}.pid").write_text(str(child.proc.pid))
    log.info("started %s (pid %d)", child.name, child.proc.pid)


def _stop_all(children: list[Child]) -> None:
    for c in children:
        if c.proc and c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for c in children:
        if c.proc is None:
            continue
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", c.name, GRACE_SECONDS)
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()


def run_embedded(settings: Settings) -> int:
    """Migrate, start the children, restart any that die, stop all on a signal."""
    from storage.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s run %(levelname)s %(message)s")
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    run_dir = settings.home.resolve() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = _child_env(settings)
    children = [Child(name, argv) for name, argv in CHILDREN.items()]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for c in children:
        _start(c, env, run_dir)
    log.info("Quantfarm is running at %s (home %s). Ctrl-C stops it.", settings.api_url, settings.home.resolve())
    try:
        while not stop.wait(0.5):
            for c in children:
                code = c.proc.poll()
                if code is None:
                    continue
                backoff = min(30.0, 2.0 ** min(c.restarts, 5)) if time.monotonic() - c.started < 10 else 0.5
                log.warning("%s exited with %s; restarting in %.1fs", c.name, code, backoff)
                if stop.wait(backoff):
                    break
                c.restarts += 1
                _start(c, env, run_dir)
    finally:
        log.info("stopping")
        _stop_all(children)
        for c in children:
            (run_dir / f"{c.name}.pid").unlink(missing_ok=True)
    return 0


def run_worker(settings: Settings) -> int:
    """Replace this process with one worker (production: one per GPU)."""
    os.execve(sys.executable, [sys.executable, "-m", "workers"], _child_env(settings))
    return 1  # not reached
