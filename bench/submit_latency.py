"""Submit → running: how long an idle worker takes to start a job once the API has accepted it.

    .venv/bin/python -m bench.submit_latency [--jobs 10] [--no-write]

The compose file's processes (tests/support/compose.py): the gunicorn API, the
service and one job worker, on PostgreSQL (``QUANTFARM_TEST_PG``'s server, a new
database), a Redis of its own and a local store. Each job (RTN on the 10-layer
tiny Llama) is submitted only when the worker is idle again; the time is from
just before the POST to the job's ``running`` event (the worker's claim), both
on this machine's clock. The worker's database poll is left at its default (10 s),
so the wake-up is what is measured: on PostgreSQL the insert's notice to the idle
worker's listening connection (storage/notices.py; the submit sends no broker
message). Goal: ≤ 1 s. Two warm-up jobs are not
counted: a gunicorn process's first request opens its database and broker
connections (seen once at 1.9 s with a single warm-up, every later one ~0.1 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import datetime
from pathlib import Path

from bench.common import md_table, run_and_record
from bench.soak import model_dir

BEGIN, END = "<!-- submit_latency:begin -->", "<!-- submit_latency:end -->"
RTN = {"method": "rtn", "options": {"group_size": 32}, "reuse": False}  # each job really runs (no reuse of the last)


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


WARM_UP = 2  # one per gunicorn worker, likely: each process's first request opens its connections


def measure(a, work: Path) -> list[tuple[float, float]]:
    from tests.conftest import PG_ADMIN, _admin_exec
    from tests.support.compose import ComposeStack
    from tests.support.servers import RedisServer

    dbname = f"qf_submit_{uuid.uuid4().hex[:8]}"
    _admin_exec(f"CREATE DATABASE {dbname}")
    try:
        with RedisServer() as redis_server, ComposeStack(
            work, database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{dbname}", broker_url=redis_server.url, s3_url="http://127.0.0.1:9",
            QUANTFARM_STORE="local", QUANTFARM_ARTIFACT_DIR=str(work / "store"), QUANTFARM_LOCAL_ROOTS=str(model_dir().parent),
        ) as stack:
            assert stack.run_once("migrate").returncode == 0, stack.logs()
            for name, service in (("api", "api"), ("service", "service"), ("worker", "worker-gpu0")):
                stack.start(service, name=name)
            stack.wait_healthy()
            stack.first_admin_key()
            body = {"model": {"source": "local", "path": str(model_dir())}, **RTN}
            seconds = []
            for i in range(a.jobs + WARM_UP):  # the first ones warm the processes up (imports, connections) and are not counted
                time.sleep(a.idle)  # the worker sits idle, as between real submissions
                sent = time.time()
                job_id = stack.post("/v1/jobs", json=body).json()["id"]
                answered = time.time()
                job = stack.wait_job(job_id, timeout=300)
                assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
                events = stack.get(f"/v1/jobs/{job_id}/events").json()["items"]
                running = next(e for e in events if e["to_status"] == "running")
                if i >= WARM_UP:
                    seconds.append((_at(running) - sent, answered - sent))
            return seconds
    finally:
        _admin_exec(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def render(measured: list[tuple[float, float]], a, started: str, load: str) -> str:
    seconds, posts = [s for s, _ in measured], [p for _, p in measured]
    p50, worst = statistics.median(seconds), max(seconds)
    rows = [["submit → running, median", f"{p50:.3f}", "≤ 1", "met" if p50 <= 1 else "**NOT met**"],
            ["submit → running, worst", f"{worst:.3f}", "≤ 1", "met" if worst <= 1 else "**NOT met**"],
            ["of which the POST itself, median / worst", f"{statistics.median(posts):.3f} / {max(posts):.3f}", "", ""]]
    return "\n".join([
        BEGIN, "## Submit → running with Redis and an idle worker", "",
        f"- Command: `.venv/bin/python -m bench.submit_latency --jobs {a.jobs} --idle {a.idle:g}`",
        f"- Date: {started}; machine: {os.cpu_count()} cores, load average at start {load}",
        "- The compose file's gunicorn API, service and one worker on PostgreSQL and a Redis of its own; "
        f"{a.jobs} RTN jobs (10-layer tiny Llama) one at a time, each after the worker sat idle {a.idle:g} s ({WARM_UP} warm-ups not counted); "
        "from just before the POST to the job's `running` event; the worker is woken by the insert's notice "
        "(storage/notices.py), not a broker message. Seconds, each: "
        + ", ".join(f"{s:.2f}" for s in seconds), "",
        md_table(["", "seconds", "goal", ""], rows), "", END,
    ])



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--idle", type=float, default=3.0, help="seconds the worker sits idle before each submit")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    return run_and_record(a, "qf-submit-", measure, render, BEGIN, END)


if __name__ == "__main__":
    raise SystemExit(main())
