"""Jobs per second through the whole farm: submit → claim → a trivial job → succeeded, with several workers.

    .venv/bin/python -m bench.jobs_per_second [--workers 4] [--jobs 40] [--no-write]

The compose file's processes (tests/support/compose.py): the gunicorn API, the
service and ``--workers`` job workers, on PostgreSQL (``QUANTFARM_TEST_PG``'s
server, a new database), a Redis of its own and a local store. The trivial job is
RTN on a 10-layer tiny Llama with evaluation off and reuse off (every job really
runs: fetch, claim, quantize, export, store, succeed). All jobs are submitted in
one burst; the rate is jobs over the time from the first POST to the last job's
``succeeded``. On this 2-core machine the workers share two cores, so the figure
is the farm's overhead per job (claims, events, store writes), not GPU work.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import datetime
from pathlib import Path

from bench.common import md_table, run_and_record
from bench.soak import model_dir

BEGIN, END = "<!-- jobs_per_second:begin -->", "<!-- jobs_per_second:end -->"
TRIVIAL = {"method": "rtn", "options": {"group_size": 32}, "evaluate": False, "reuse": False}


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def measure(a, work: Path) -> dict:
    from tests.conftest import PG_ADMIN, _admin_exec
    from tests.support.compose import ComposeStack
    from tests.support.servers import RedisServer

    dbname = f"qf_jps_{uuid.uuid4().hex[:8]}"
    _admin_exec(f"CREATE DATABASE {dbname}")
    try:
        with RedisServer() as redis_server, ComposeStack(
            work, database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{dbname}", broker_url=redis_server.url, s3_url="http://127.0.0.1:9",
            QUANTFARM_STORE="local", QUANTFARM_ARTIFACT_DIR=str(work / "store"), QUANTFARM_LOCAL_ROOTS=str(model_dir().parent),
            QUANTFARM_TEAM_MAX_QUEUED=str(a.jobs + 10),
        ) as stack:
            assert stack.run_once("migrate").returncode == 0, stack.logs()
            stack.start("api", name="api")
            stack.start("service", name="service")
            for i in range(a.workers):
                stack.start("worker-gpu0", name=f"worker-{i}")
            stack.wait_healthy()
            stack.first_admin_key()
            body = {"model": {"source": "local", "path": str(model_dir())}, **TRIVIAL}
            warm = stack.wait_job(stack.post("/v1/jobs", json=body).json()["id"], timeout=300)  # imports, connections
            assert warm["status"] == "succeeded", f"{warm}\n{stack.logs()}"
            time.sleep(2)
            t0 = time.time()
            ids = [stack.post("/v1/jobs", json=body).json()["id"] for _ in range(a.jobs)]
            submitted = time.time() - t0
            jobs = [stack.wait_job(job_id, timeout=a.timeout) for job_id in ids]
            bad = [j for j in jobs if j["status"] != "succeeded"]
            assert not bad, f"{bad[:2]}\n{stack.logs()}"
            ends = [_at(j["finished_at"]) for j in jobs]
            spans = [_at(j["finished_at"]) - _at(j["started_at"]) for j in jobs]
            return {"jobs": a.jobs, "workers": a.workers, "seconds": max(ends) - t0, "submit_seconds": submitted,
                    "run_median": statistics.median(spans)}
    finally:
        _admin_exec(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def render(r: dict, a, started: str, load: str) -> str:
    rate = r["jobs"] / r["seconds"]
    rows = [["jobs per second (submit burst → all succeeded)", f"{rate:.2f}"],
            ["jobs / workers", f"{r['jobs']} / {r['workers']}"],
            ["seconds, first POST → last succeeded", f"{r['seconds']:.1f}"],
            ["seconds to POST the whole burst", f"{r['submit_seconds']:.2f}"],
            ["median seconds a job ran (started → finished)", f"{r['run_median']:.2f}"]]
    return "\n".join([
        BEGIN, "## Jobs per second through the farm (submit → claim → trivial job → succeeded)", "",
        f"- Command: `.venv/bin/python -m bench.jobs_per_second --workers {a.workers} --jobs {a.jobs}`",
        f"- Date: {started}; machine: 2 cores, load average at start {load}",
        "- The compose file's gunicorn API, service and job workers on PostgreSQL and a Redis of its own; RTN on a "
        "10-layer tiny Llama, evaluation and reuse off, all jobs POSTed in one burst after one warm-up job. The workers "
        "share the machine's two cores, so this is the farm's per-job overhead, not quantization speed.", "",
        md_table(["", "measured"], rows), "", END,
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    return run_and_record(a, "qf-jps-", measure, render, BEGIN, END)


if __name__ == "__main__":
    raise SystemExit(main())
