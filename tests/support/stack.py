"""Start the embedded stack (`quantfarm run`) as a user would, and talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedStack:
    """`quantfarm run` in a subprocess with its own home, port and short leases."""

    def __init__(self, home: Path, **env: str):
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "QUANTFARM_HOME": str(self.home),
            "QUANTFARM_PORT": str(self.port),
            "QUANTFARM_LEASE_SECONDS": "4",
            "QUANTFARM_HEARTBEAT_SECONDS": "1",
            "QUANTFARM_SWEEP_SECONDS": "1",
            "QUANTFARM_TORCH_THREADS": "1",
            "QUANTFARM_WEBHOOK_ALLOW_PRIVATE": "true",
            "GPTQMODEL_CPU_WORKERS": "2",
            **env,
        }
        for k in ("QUANTFARM_DATABASE_URL", "QUANTFARM_BROKER_URL", "QUANTFARM_STORE"):
            if k not in env:
                self.env.pop(k, None)
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "run.log"

    def start(self, timeout: float = 90) -> "EmbeddedStack":
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([str(BIN / "quantfarm"), "run"], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"quantfarm run exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200 and self.pid("worker"):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the stack did not become healthy:\n{self.log.read_text()[-4000:]}")

    def pid(self, child: str) -> int | None:
        p = self.home / "run" / f"{child}.pid"
        return int(p.read_text()) if p.is_file() else None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the supervisor (as Ctrl-C would) and return its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    # --- HTTP helpers -------------------------------------------------------------

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def submit(self, body: dict) -> str:
        r = self.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def wait(self, job_id: str, *, until=("succeeded", "failed", "cancelled"), timeout: float = 240, on_poll=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}").json()
            if on_poll:
                on_poll(job)
            if job["status"] in until:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def download_artifact(self, job: dict, dest: Path) -> Path:
        (art,) = job["artifacts"]
        files = self.get(f"/v1/artifacts/{art['id']}/files").json()
        items = files["items"] if isinstance(files, dict) else files
        for f in items:
            r = self.get(f"/v1/artifacts/{art['id']}/files/{f['path']}")
            assert r.status_code == 200, r.text
            (dest / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            (dest / f["path"]).write_bytes(r.content)
        return dest
