"""Where one API request's time goes: cProfile of each endpoint in-process (the WSGI app, PostgreSQL, auth on).

    .venv/bin/python -m bench.profile_api [--requests 300] [--rounds 7] [--top 25] [--only get|list|post|healthz] [--cpu]
        [--sort cumulative|tottime] [--timing-only] [--redis redis://127.0.0.1:6379/0]

Builds the farm app the way gunicorn does (``create_app`` from settings: a real
Dispatcher, so ``--redis`` must name a Redis; auth on, an admin key made in a new
PostgreSQL database of ``QUANTFARM_TEST_PG``'s server, 200 jobs) and profiles
``--requests`` calls of GET one job, list, POST and /healthz, each after a
warm-up. Prints a table of wall and CPU microseconds per request (the app and
the trivial ceiling called as WSGI apps), then each profile's top functions.
On a busy machine wall time is mostly waiting for a CPU: ``--cpu`` profiles
this process's CPU time instead. Not a load test: bench/api_load.py is.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path


def _environ(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> dict:
    from werkzeug.test import EnvironBuilder

    env = EnvironBuilder(path=path, method=method, data=body, headers=headers or {},
                         content_type="application/json" if body else None, base_url="http://127.0.0.1/").get_environ()
    env["REMOTE_ADDR"] = "127.0.0.1"
    return env


def wsgi_call(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    """A function making one call of the WSGI app itself, as gunicorn does; it returns the status line.

    ``app(environ, start_response)``: Flask's ``__call__``, then ``app.wsgi_app`` with its
    middleware (api/fastpath.py). The environ is built once, outside any clock.
    """
    environ = _environ(method, path, body, headers)

    def once() -> str:
        env = dict(environ)
        env["wsgi.input"] = io.BytesIO(body)
        status = []
        out = app(env, lambda line, hdrs, exc=None: status.append(line))
        b"".join(out)
        getattr(out, "close", lambda: None)()
        return status[0]

    return once


def per_request_us(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                   n: int = 300) -> tuple[float, float]:
    """Mean wall and CPU microseconds of one call of the WSGI app itself (no test client, no profiler).

    CPU is this process's (the Python side); wall adds the database's and broker's answers.
    """
    once = wsgi_call(app, method, path, body, headers)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        once()
    return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def timing_table(app, job_id: str, key: str, n: int, rounds: int = 7) -> str:
    """Microseconds per request of each endpoint, and of the trivial ceiling app, called as WSGI apps in this process.

    Each round times ``n`` requests of every endpoint in turn; the table gives each
    endpoint's fastest round: other work on a shared machine only ever adds time
    (waits, a CPU's caches shared), so the least disturbed round is the closest.
    """
    from bench.api_ceiling import app as ceiling
    from bench.api_load import POST_BODY

    auth = {"Authorization": f"Bearer {key}"}
    calls = [
        ("ceiling GET /ping", ceiling, "GET", "/ping", b"", None),
        ("GET /v1/jobs/{id}", app, "GET", f"/v1/jobs/{job_id}", b"", auth),
        ("GET /v1/jobs?limit=20", app, "GET", "/v1/jobs?limit=20", b"", auth),
        ("POST /v1/jobs", app, "POST", "/v1/jobs", json.dumps(POST_BODY).encode(), auth),
        ("GET /healthz", app, "GET", "/healthz", b"", None),
    ]
    for _, wsgi, method, path, body, headers in calls:  # warm-up: the key verified, statements compiled, pools filled
        per_request_us(wsgi, method, path, body, headers, n=20)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in calls}
    for _ in range(rounds):
        for label, wsgi, method, path, body, headers in calls:
            times[label].append(per_request_us(wsgi, method, path, body, headers, n=n))
    rows = [(label, min(w for w, _ in t), min(c for _, c in t)) for label, t in times.items()]
    base = rows[0][2]
    lines = [f"| request | wall µs per request (fastest round) | CPU µs per request (fastest of {rounds} rounds of {n}) | ceiling CPU / this |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {wall:,.0f} | {cpu:,.0f} | {base / cpu:.2f} |" for label, wall, cpu in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (the table gives each endpoint's fastest round)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--redis", default=os.environ.get("QUANTFARM_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--only", help="one of get, list, post, healthz")
    ap.add_argument("--sort", default="cumulative", help="pstats order: cumulative or tottime")
    ap.add_argument("--cpu", action="store_true", help="profile CPU time (this process's), not wall time: on a busy machine, "
                    "wall time is mostly waiting for the CPU")
    ap.add_argument("--timing-only", action="store_true", help="print the per-request times, no profiles")
    a = ap.parse_args(argv)

    from api.app import create_app
    from bench.api_load import POST_BODY
    from quantfarm.cli_access import create_key_locally
    from quantfarm.secrets import new_key
    from quantfarm.settings import Settings
    from quantfarm.spec import parse_spec, public_spec, spec_secrets
    from storage import jobs
    from storage.db import Database
    from tests.conftest import PG_ADMIN, _admin_exec

    work = Path(tempfile.mkdtemp(prefix="qf-profile-api-"))
    name = f"qf_prof_{uuid.uuid4().hex[:8]}"
    _admin_exec(f"CREATE DATABASE {name}")
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        settings = Settings(database_url=url, broker_url=a.redis, secret_key=new_key(), auth="on", home=work / "home",
                            store="local", artifact_dir=work / "store", team_max_queued=10**9, local_roots=[Path("/models")])
        key = create_key_locally(settings, team="bench", role="admin", name="bench")
        db = Database.from_settings(settings)
        spec = parse_spec(POST_BODY)
        with db.session() as s:
            ids = [jobs.create_job(s, method="rtn", model_ref="local:/models/bench-tiny", spec=public_spec(spec),
                                   secrets=spec_secrets(spec), team_id=key["team_id"]).id for _ in range(200)]
        app = create_app(settings, db=db)
        auth = {"Authorization": f"Bearer {key['key']}"}
        calls = {
            "get": wsgi_call(app, "GET", f"/v1/jobs/{ids[100]}", headers=auth),
            "list": wsgi_call(app, "GET", "/v1/jobs?limit=20", headers=auth),
            "post": wsgi_call(app, "POST", "/v1/jobs", json.dumps(POST_BODY).encode(), auth),
            "healthz": wsgi_call(app, "GET", "/healthz"),
        }
        print(timing_table(app, ids[100], key["key"], a.requests, a.rounds))
        for kind, call in calls.items():
            if a.only and kind != a.only or a.timing_only:
                continue
            for _ in range(20):
                status = call()
                assert status[:1] == "2", (kind, status)
            prof = cProfile.Profile(time.process_time) if a.cpu else cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(a.requests):
                call()
            prof.disable()
            per = (time.perf_counter() - t0) / a.requests * 1000
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(a.sort).print_stats(a.top)
            print(f"===== {kind}: {per:.2f} ms per request (profiled, the WSGI app called as gunicorn calls it) =====")
            print(out.getvalue())
        db.dispose()
    finally:
        _admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
