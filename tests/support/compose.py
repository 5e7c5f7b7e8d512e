"""Start the farm's processes the way ``docker-compose.yml`` starts them, on this machine.

The commands and environment come from the compose file itself (so a change
there is what the tests run); only addresses differ: the database, broker and
S3 endpoint are the tests' own, the API binds a spare loopback port, and
workers use the CPU. Every process runs in its own session and is killed with
its children on ``close``, also when a test fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from tests.conftest import TEST_SECRET_KEY
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def compose_file() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Resolve compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` against ``env``, as compose does."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"compose needs {name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _argv(command: list[str], port: int) -> list[str]:
    exe = {"python": sys.executable, "quantfarm": str(BIN / "quantfarm"), "gunicorn": str(BIN / "gunicorn")}
    argv = [exe.get(command[0], command[0]), *command[1:]]
    return [f"127.0.0.1:{port}" if a.startswith("0.0.0.0:") else a for a in argv]


class ComposeStack:
    """The compose services ``migrate``, ``api``, ``service`` and workers as local processes."""

    def __init__(self, workdir: Path, *, database_url: str, broker_url: str, s3_url: str, **env: str):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spec = compose_file()["services"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}
        given = {"QUANTFARM_SECRET_KEY": TEST_SECRET_KEY, "QUANTFARM_TRUSTED_HOSTS": "127.0.0.1,localhost", **env}
        base = {k: interpolate(str(v), given) for k, v in self.spec["api"]["environment"].items()}
        self.token: str | None = None  # the first admin key, once made
        base.update({
            "QUANTFARM_DATABASE_URL": database_url, "QUANTFARM_BROKER_URL": broker_url,
            "QUANTFARM_S3_ENDPOINT_URL": s3_url, "QUANTFARM_S3_PUBLIC_ENDPOINT_URL": s3_url,
            "QUANTFARM_HOST": "127.0.0.1", "QUANTFARM_HOME": str(self.workdir / "home"),
            "QUANTFARM_LEASE_SECONDS": "6", "QUANTFARM_HEARTBEAT_SECONDS": "1", "QUANTFARM_SWEEP_SECONDS": "1",
            "QUANTFARM_TORCH_THREADS": "1", "QUANTFARM_STORE_STARTUP_WAIT_SECONDS": "20",
        })
        base.update(env)
        self.env = {**os.environ, **{k: str(v) for k, v in base.items()}, "PYTHONUNBUFFERED": "1"}

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def logs(self) -> str:
        return "\n".join(f"--- {p.stem}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    def first_admin_key(self) -> str:
        """Make the farm's first admin key the way the compose file's header tells an operator to; use it from now on."""
        out = subprocess.run([str(BIN / "quantfarm"), "keys", "create", "--local", "--team", "ops", "--role", "admin", "--name", "first-admin"],
                             env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        self.token = out.stdout.split()[0]
        return self.token

    def _auth(self, kw: dict) -> dict:
        if self.token:
            kw["headers"] = {"Authorization": f"Bearer {self.token}", **kw.get("headers", {})}
        return kw

    def run_once(self, service: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a one-shot service (``migrate``) to completion."""
        with open(self.log(service), "wb") as out:
            return subprocess.run(_argv(self.spec[service]["command"], self.port), env=self.env, cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)

    def start(self, service: str, name: str | None = None, **env: str) -> subprocess.Popen:
        """Start a long-running service; ``name`` tells several of one service apart."""
        name = name or service
        spec = self.spec[service]
        penv = {**self.env, **{k: interpolate(str(v), self.env) for k, v in (spec.get("environment") or {}).items() if not k.startswith("QUANTFARM_")}}
        penv.pop("CUDA_VISIBLE_DEVICES", None)
        penv.update({"QUANTFARM_DEVICE": "cpu", "QUANTFARM_SCRATCH_DIR": str(self.workdir / f"scratch-{name}"), **env})
        if "QUANTFARM_METRICS_PORT" in (spec.get("environment") or {}):  # each local process needs a port of its own
            self.metrics_ports[name] = free_port()
            penv["QUANTFARM_METRICS_PORT"] = str(self.metrics_ports[name])
        out = open(self.log(name), "ab")
        proc = subprocess.Popen(_argv(spec["command"], self.port), env=penv, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            api = self.procs.get("api")
            if api is not None and api.poll() is not None:
                raise RuntimeError(f"the API exited with {api.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API did not become healthy:\n{self.logs()}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # --- HTTP ------------------------------------------------------------------------

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **self._auth(kw))

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **self._auth(kw))

    def wait_job(self, job_id: str, timeout: float = 180, until=("succeeded", "failed", "cancelled"), on_poll=None) -> dict:
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            r = self.get(f"/v1/jobs/{job_id}")
            if on_poll:
                on_poll(r)
            if r.status_code == 200:
                job = r.json()
                if job["status"] in until:
                    return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout}s:\n{self.logs()}")

    def __enter__(self) -> "ComposeStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
