"""Soak: GPTQ jobs on two workers while a random worker is killed with SIGKILL every few seconds.

    .venv/bin/python -m bench.soak [--jobs 20] [--kill-every 4] [--seed 0] [--no-write]

The processes are the compose file's (tests/support/compose.py): the gunicorn API,
the service (sweeper) and two job workers, on PostgreSQL (``QUANTFARM_TEST_PG``'s
server, a new database), a Redis of its own and a local store, with 4 s leases.
A killed worker is started again a second later, as compose's ``restart:
unless-stopped`` would. Reported: jobs lost, duplicate artifacts, outputs that
differ from an undisturbed run's, attempts, and the layers computed more than once.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.common import md_table, run_and_record

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
# reuse off: the jobs are identical on purpose (each output is compared with one undisturbed run), and each must compute
GPTQ = {"method": "gptq", "options": {"group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64}, "reuse": False}
TERMINAL = ("succeeded", "failed", "cancelled")


def model_dir() -> Path:
    from tests.conftest import CACHE
    from tests.support.models import make_tiny_model, train_tokenizer

    return make_tiny_model(CACHE / "deep-llama-10", "llama", tokenizer_dir=train_tokenizer(CACHE / "tokenizer"), layers=10)


def files_of(stack, job: dict) -> dict[str, str]:
    (art,) = job["artifacts"]
    return {f["path"]: f["sha256"] for f in stack.get(f"/v1/artifacts/{art['id']}/files").json()["items"]}


class Killer(threading.Thread):
    """SIGKILL a random worker every ``every`` seconds (± half), start it again a second later."""

    def __init__(self, stack, names: list[str], every: float, seed: int):
        super().__init__(daemon=True)
        self.stack, self.names, self.every = stack, names, every
        self.rng = random.Random(seed)
        self.kills = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.wait(self.every * self.rng.uniform(0.5, 1.5)):
            name = self.rng.choice(self.names)
            with self.lock:
                if self.stop.is_set():
                    return
                self.stack.kill(name, signal.SIGKILL)
                self.kills += 1
            if self.stop.wait(1.0):
                return
            with self.lock:
                if not self.stop.is_set():
                    self.stack.start("worker-gpu0", name=name)

    def halt(self) -> None:
        """Stop killing; a worker killed last stays down (the stack closes next)."""
        with self.lock:
            self.stop.set()
        self.join(30)


def soak(a, work: Path) -> dict:
    from tests.conftest import PG_ADMIN, _admin_exec
    from tests.support.compose import ComposeStack
    from tests.support.servers import RedisServer

    dbname = f"qf_soak_{uuid.uuid4().hex[:8]}"
    _admin_exec(f"CREATE DATABASE {dbname}")
    try:
        with RedisServer() as redis_server, ComposeStack(
            work, database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{dbname}", broker_url=redis_server.url, s3_url="http://127.0.0.1:9",
            QUANTFARM_STORE="local", QUANTFARM_ARTIFACT_DIR=str(work / "store"), QUANTFARM_LEASE_SECONDS="4",
            QUANTFARM_TEAM_MAX_QUEUED="1000", QUANTFARM_LOCAL_ROOTS=str(model_dir().parent),
        ) as stack:
            assert stack.run_once("migrate").returncode == 0, stack.logs()
            for name, service in (("api", "api"), ("service", "service"), ("worker-a", "worker-gpu0"), ("worker-b", "worker-gpu0")):
                stack.start(service, name=name)
            stack.wait_healthy()
            stack.first_admin_key()
            body = {"model": {"source": "local", "path": str(model_dir())}, **GPTQ}
            reference = stack.wait_job(stack.post("/v1/jobs", json=body).json()["id"], timeout=600)
            assert reference["status"] == "succeeded", stack.logs()
            ref_files = files_of(stack, reference)
            started = time.monotonic()
            ids = [stack.post("/v1/jobs", json=body).json()["id"] for _ in range(a.jobs)]
            killer = Killer(stack, ["worker-a", "worker-b"], a.kill_every, a.seed)
            killer.start()
            try:
                deadline = time.monotonic() + a.timeout
                while time.monotonic() < deadline:
                    jobs = [stack.get(f"/v1/jobs/{i}").json() for i in ids]
                    if all(j["status"] in TERMINAL for j in jobs):
                        break
                    time.sleep(1.0)
            finally:
                killer.halt()
            return tally(stack, jobs, ref_files, killer.kills, time.monotonic() - started)
    finally:
        _admin_exec(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def tally(stack, jobs: list[dict], ref_files: dict, kills: int, seconds: float) -> dict:
    out = {"jobs": len(jobs), "kills": kills, "seconds": round(seconds, 1), "succeeded": 0, "failed": 0, "lost": 0,
           "duplicate_artifacts": 0, "identical": 0, "attempts": 0, "layers_total": 0, "layers_computed": 0, "layers_resumed": 0}
    for job in jobs:
        out["attempts"] += job["attempt"]
        if job["status"] not in TERMINAL:
            out["lost"] += 1
            continue
        out["succeeded" if job["status"] == "succeeded" else "failed"] += 1
        if job["status"] != "succeeded":
            out.setdefault("errors", []).append(f"{job['id']} attempt {job['attempt']}: {job['status']} {job.get('error')}")
        out["duplicate_artifacts"] += max(0, len(job["artifacts"]) - 1)
        if job["status"] == "succeeded" and files_of(stack, job) == ref_files:
            out["identical"] += 1
        events = stack.get(f"/v1/jobs/{job['id']}/events").json()["items"]
        progress = [e["data"] for e in events if e["kind"] == "progress"]
        if job["status"] == "succeeded":  # work a failed job did counts as extra work, its layers as not needed
            out["layers_total"] += (job.get("progress") or {}).get("layers_total") or 0
        out["layers_computed"] += sum(1 for p in progress if not p.get("resumed"))
        out["layers_resumed"] += sum(1 for p in progress if p.get("resumed"))
    out["layers_recomputed"] = out["layers_computed"] - out["layers_total"]
    return out


def render(r: dict, a, started: str, load: str) -> str:
    ok = lambda cond: "met" if cond else "**NOT met**"  # noqa: E731
    rows = [
        ["jobs lost (not ended)", r["lost"], "0", ok(r["lost"] == 0)],
        ["jobs failed", r["failed"], "0", ok(r["failed"] == 0)],
        ["duplicate artifacts", r["duplicate_artifacts"], "0", ok(r["duplicate_artifacts"] == 0)],
        ["outputs byte-identical to an undisturbed run", f"{r['identical']} / {r['jobs']}", f"{r['jobs']} / {r['jobs']}",
         ok(r["identical"] == r["jobs"])],
        ["workers killed (SIGKILL)", r["kills"], "", ""],
        ["attempts (1 per job if never interrupted)", r["attempts"], "", ""],
        ["layers computed (all jobs) / needed (succeeded jobs)", f"{r['layers_computed']} / {r['layers_total']}", "", ""],
        ["extra work: layers recomputed", r["layers_recomputed"], "", ""],
        ["layers replayed from checkpoints", r["layers_resumed"], "", ""],
        ["wall time s (after the reference job)", r["seconds"], "", ""],
    ]
    cmd = f".venv/bin/python -m bench.soak --jobs {a.jobs} --kill-every {a.kill_every} --seed {a.seed}"
    return "\n".join([
        BEGIN, "## Soak: GPTQ jobs while workers are killed", "",
        f"- Command: `{cmd}`", f"- Date: {started}; machine: {os.cpu_count()} cores, load average at start {load}",
        f"- {a.jobs} GPTQ jobs (10-layer tiny Llama, group 32) on two workers started with the compose file's command, "
        "PostgreSQL, a Redis of its own, 4 s leases, the service's sweeper every second; a random worker SIGKILLed about every "
        f"{a.kill_every:g} s and started again a second later.", "",
        md_table(["", "measured", "goal", ""], rows), "",
        *([f"- Not succeeded: {e}" for e in r.get("errors", [])] + [""] if r.get("errors") else []), END,
    ])



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills, on average (a worker takes ~10 s to start on a busy 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    return run_and_record(a, "qf-soak-", soak, render, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
