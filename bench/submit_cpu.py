"""CPU per submit when several threads of one process submit at once: the process's own and its PostgreSQL backends'.

    .venv/bin/python -m bench.submit_cpu [--threads 8] [--requests 150] [--rounds 3] [--redis redis://127.0.0.1:6379/0]

Builds the farm app as bench/profile_api.py does (create_app from settings: PostgreSQL
in a new database of ``QUANTFARM_TEST_PG``'s server, a real Dispatcher on ``--redis``,
auth on with an admin key) and has ``--threads`` threads each call it as gunicorn's
threads would (``app(environ, start_response)``, POST /v1/jobs of a local model)
``--requests`` times. For each round it prints the submits a second, this process's
user and system CPU per submit and that of the database backends serving it (read
from /proc), its context switches a submit, and, where the app batches submits (api/submits.py), the jobs a
statement. Unlike bench/api_load.py nothing else runs in the process (no gunicorn,
no HTTP), so it prices the submit itself at a gunicorn worker's concurrency.
Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def backends_cpu(url: str) -> float:
    """CPU seconds so far of every backend connected to ``url``'s database (but the one asking)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        me = conn.info.backend_pid
        pids = [pid for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
                if pid != me]
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / HZ
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=150, help="submits per thread per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--redis", default=os.environ.get("QUANTFARM_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    a = ap.parse_args(argv)

    import redis

    from api.app import create_app
    from bench.api_load import POST_BODY
    from bench.profile_api import wsgi_call
    from quantfarm.cli_access import create_key_locally
    from quantfarm.secrets import new_key
    from quantfarm.settings import Settings
    from storage.db import Database
    from tests.conftest import PG_ADMIN, _admin_exec

    work = Path(tempfile.mkdtemp(prefix="qf-submit-cpu-"))
    name = f"qf_submit_{uuid.uuid4().hex[:8]}"
    queue = f"qf-submit-cpu-{uuid.uuid4().hex[:8]}"
    _admin_exec(f"CREATE DATABASE {name}")
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        settings = Settings(database_url=url, broker_url=a.redis, queue=queue, secret_key=new_key(), auth="on",
                            home=work / "home", store="local", artifact_dir=work / "store", team_max_queued=10**9,
                            local_roots=[Path("/models")])
        key = create_key_locally(settings, team="bench", role="admin", name="bench")
        db = Database.from_settings(settings)
        app = create_app(settings, db=db)
        body = json.dumps(POST_BODY).encode()
        calls = [wsgi_call(app, "POST", "/v1/jobs", body, {"Authorization": f"Bearer {key['key']}"}) for _ in range(a.threads)]
        for call in calls:  # warm-up: the key verified, statements prepared, pools filled
            for _ in range(10):
                assert call()[:3] == "201"
        batches = getattr(app.wsgi_app, "submits", None)

        def run(call) -> None:
            for _ in range(a.requests):
                call()

        for n_round in range(a.rounds):
            made = (batches.batches, batches.jobs) if batches is not None else None
            pg0, t0, w0, r0 = backends_cpu(url), os.times(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            threads = [threading.Thread(target=run, args=(call,)) for call in calls]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            w1, t1, r1, pg1 = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF), backends_cpu(url)
            n = a.threads * a.requests
            per = f"{(batches.jobs - made[1]) / max(1, batches.batches - made[0]):.1f} jobs a statement" if made else "one a statement"
            print(f"round {n_round + 1}: {n / (w1 - w0):,.0f} submits/s; process user {(t1.user - t0.user) / n * 1e6:,.0f} + "
                  f"system {(t1.system - t0.system) / n * 1e6:,.0f} µs a submit; PostgreSQL backends {(pg1 - pg0) / n * 1e6:,.0f} µs; "
                  f"{per}; context switches a submit {(r1.ru_nvcsw - r0.ru_nvcsw) / n:.1f} voluntary, "
                  f"{(r1.ru_nivcsw - r0.ru_nivcsw) / n:.1f} involuntary; load {os.getloadavg()[0]:.1f}", flush=True)
        db.dispose()
    finally:
        r = redis.Redis.from_url(a.redis)
        r.delete(queue)
        r.close()
        _admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
