"""The embedded stack: API, one job worker and the service worker (sweeper + webhooks).

``quantfarm run`` starts them in the foreground and says it is running once the API
answers. A child that dies during start-up (say, the API's port is taken) stops
the whole stack with a non-zero exit and says why; one that dies later is
restarted (a killed worker's job is requeued by the sweeper and resumes from its
checkpoints). One Ctrl-C or SIGTERM stops every child: SIGTERM to its process
group first (a worker hands its job back at the next layer), SIGKILL after
``QUANTFARM_STOP_GRACE_SECONDS``. The signal handler only sets a flag.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
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
POLL_SECONDS = 0.2


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default=0.0)


class StopFlag:
    """Set by SIGINT/SIGTERM. The handler assigns one attribute: no locks, no I/O."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return whether a stop was asked for."""
        deadline = time.monotonic() + seconds
        while self.signum is None and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return self.signum is not None


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["QUANTFARM_HOME"] = str(settings.home.resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _start(child: Child, env: dict[str, str], run_dir: Path) -> None:
    # Own session: a terminal Ctrl-C reaches only us, and we stop the children in order.
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    child.proc = subprocess.Popen([sys.executable, *child.argv], env=env, start_new_session=True, preexec_fn=preexec)
    child.started = time.monotonic()
    (run_dir / f"{child.name}.pid").write_text(str(child.proc.pid))
    log.info("started %s (pid %d)", child.name, child.proc.pid)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session: this reaches its children too
    except ProcessLookupError:
        pass


def stop_all(children: list[Child], grace: float) -> None:
    """SIGTERM every child's group, wait up to ``grace`` seconds, SIGKILL what is left."""
    for c in children:
        if c.proc and c.proc.poll() is None:
            _signal_group(c.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in children:
        if c.proc is None:
            continue
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", c.name, grace)
            _signal_group(c.proc, signal.SIGKILL)
            c.proc.wait()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


def _api_answers(settings: Settings) -> bool:
    try:
        with socket.create_connection((settings.host.strip("[]"), settings.port), timeout=1):
            return True
    except OSError:
        return False


def _died_at_startup(c: Child, settings: Settings) -> str:
    hint = f"; is port {settings.port} on {settings.host} already in use?" if c.name == "api" else ""
    return f"{c.name} exited with {c.proc.returncode} while the stack was starting{hint} Stopping everything."


def _wait_until_up(children: list[Child], settings: Settings, stop: StopFlag) -> str | None:
    """Wait for the API to answer; return why start-up failed (None when it is up, or stopped)."""
    deadline = time.monotonic() + settings.startup_timeout_seconds
    while not stop.wait(POLL_SECONDS):
        for c in children:
            if c.proc.poll() is not None:
                return _died_at_startup(c, settings)
        if _api_answers(settings):
            return None
        if time.monotonic() > deadline:
            return f"the API did not answer on port {settings.port} within {settings.startup_timeout_seconds:.0f}s. Stopping everything."
    return None


def _supervise(children: list[Child], env: dict[str, str], run_dir: Path, stop: StopFlag) -> None:
    """Restart children that die, until a stop is asked for."""
    while not stop.wait(0.5):
        for c in children:
            code = c.proc.poll()
            if code is None:
                continue
            backoff = min(30.0, 2.0 ** min(c.restarts, 5)) if time.monotonic() - c.started < 10 else 0.5
            log.warning("%s exited with %s; restarting in %.1fs", c.name, code, backoff)
            if stop.wait(backoff):
                return
            c.restarts += 1
            _start(c, env, run_dir)


def run_embedded(settings: Settings) -> int:
    """Migrate, start the children, restart any that die, stop all on a signal; return the exit code."""
    from storage.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s run %(levelname)s %(message)s")
    stop = StopFlag()
    stop.install()
    if port_in_use(settings.host, settings.port):
        log.error("Port %d on %s is already in use; stop what holds it or set QUANTFARM_PORT.", settings.port, settings.host)
        return 1
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    run_dir = settings.home.resolve() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = _child_env(settings)
    children = [Child(name, argv) for name, argv in CHILDREN.items()]
    code = 0
    try:
        for c in children:
            _start(c, env, run_dir)
        failure = _wait_until_up(children, settings, stop)
        if failure:
            log.error("%s", failure)
            code = 1
        elif stop.signum is None:
            log.info("Quantfarm is running at %s (home %s). Ctrl-C stops it.", settings.api_url, settings.home.resolve())
            _supervise(children, env, run_dir, stop)
    finally:
        log.info("stopping")
        stop_all(children, settings.stop_grace_seconds)
        for c in children:
            (run_dir / f"{c.name}.pid").unlink(missing_ok=True)
    return code


def run_worker(settings: Settings) -> int:
    """Replace this process with one worker (production: one per GPU)."""
    os.execve(sys.executable, [sys.executable, "-m", "workers"], _child_env(settings))
    return 1  # not reached
