"""`quantfarm run`'s supervisor in a real subprocess, with small stand-in children.

The children are tiny Python processes (a TCP listener for the API, sleepers for the
workers) so the tests exercise the supervisor's signals, start-up and stop logic
without loading the engine; tests/e2e runs the real stack.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.stack import free_port

LISTEN = ("import os, socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
          "s.bind(('127.0.0.1', int(os.environ['QUANTFARM_PORT']))); s.listen(); time.sleep(600)")
SLEEP = "import time; time.sleep(600)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
DRIVER = ("import json, sys; from quantfarm import supervisor; from quantfarm.settings import Settings; "
          "supervisor.CHILDREN = json.loads(sys.argv[1]); sys.exit(supervisor.run_embedded(Settings()))")


def start(tmp_path, children: dict[str, str], port: int | None = None, grace: float = 2.0):
    env = {**os.environ, "QUANTFARM_HOME": str(tmp_path / "home"), "QUANTFARM_PORT": str(port or free_port()),
           "QUANTFARM_STOP_GRACE_SECONDS": str(grace), "QUANTFARM_STARTUP_TIMEOUT_SECONDS": "30"}
    env.pop("QUANTFARM_DATABASE_URL", None)
    argv = json.dumps({name: ["-c", code] for name, code in children.items()})
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, argv], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tmp_path / "run.log", tmp_path / "home" / "run"


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def child_pids(run_dir, names) -> dict[str, int]:
    return {n: int((run_dir / f"{n}.pid").read_text()) for n in names}


def test_sigterm_to_the_process_group_stops_every_child_within_the_grace_period(tmp_path):
    proc, log, run_dir = start(tmp_path, {"api": LISTEN, "worker": SLEEP, "service": STUBBORN})
    try:
        assert wait_for(lambda: b"Quantfarm is running" in log.read_bytes()), log.read_text()
        pids = child_pids(run_dir, ["api", "worker", "service"])
        assert all(alive(p) for p in pids.values())
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # as `kill -TERM -<pgid>` does
        assert proc.wait(timeout=20) == 0, log.read_text()
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not any(alive(p) for p in pids.values()), log.read_text()
    assert 2.0 <= took < 10  # the stubborn child was killed once its 2 s grace ran out, not before
    assert "service did not stop in 2s; killing it" in log.read_text()
    assert not list(run_dir.glob("*.pid"))


def test_a_busy_port_stops_the_stack_at_once_with_a_message_naming_it(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc, log, run_dir = start(tmp_path, {"api": LISTEN, "worker": SLEEP, "service": SLEEP}, port=port)
        assert proc.wait(timeout=30) != 0
    text = log.read_text()
    assert f"Port {port} on 127.0.0.1 is already in use" in text and "Quantfarm is running" not in text
    assert not run_dir.exists() or not list(run_dir.glob("*.pid"))


def test_a_child_that_dies_at_start_up_stops_the_whole_stack_with_a_non_zero_exit(tmp_path):
    proc, log, run_dir = start(tmp_path, {"api": "import sys; sys.exit(3)", "worker": SLEEP, "service": SLEEP})
    pids = {}
    try:
        assert wait_for(lambda: (run_dir / "worker.pid").is_file())
        pids = child_pids(run_dir, ["worker"])
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    port = int(text.split("is port ")[1].split()[0]) if "is port " in text else None
    assert "api exited with 3 while the stack was starting" in text and port is not None, text
    assert "Quantfarm is running" not in text
    assert wait_for(lambda: not alive(pids["worker"]), 5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_children_do_not_outlive_a_killed_supervisor(tmp_path):
    proc, log, run_dir = start(tmp_path, {"api": LISTEN, "worker": SLEEP, "service": SLEEP})
    try:
        assert wait_for(lambda: b"Quantfarm is running" in log.read_bytes()), log.read_text()
        pids = child_pids(run_dir, ["api", "worker", "service"])
        proc.kill()
        proc.wait(timeout=10)
        assert wait_for(lambda: not any(alive(p) for p in pids.values()), 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
