"""The ceiling and POST /v1/jobs under other gunicorn shapes (workers x threads), side by side, alternating.

    .venv/bin/python -m bench.api_shapes [--shapes 2x8,3x8,4x8,2x16,2xg] [--rounds 2] [--duration 8]

A shape ``NxK`` is N workers of K threads each; ``Nxg`` is N gevent workers
(``--worker-class gevent``, 1,000 connections each; gevent is not a dependency of the
farm: ``.venv/bin/pip install -c constraints.txt gevent`` first).

The compose file runs the API as 2 workers x 8 threads. For each shape, in turn and
``--rounds`` times, this starts the trivial ceiling (bench/api_ceiling.py) and the
farm with that shape (the bench's PostgreSQL database with 200 jobs and a Redis of
its own, bench/api_load.py's ``Servers``; gunicorn.conf.py applies to both), runs
``wrk -t2 -c32`` against the ceiling and then against POST /v1/jobs, and prints
both rates and their ratio. A shape whose ratio rises only because its ceiling
falls did not make submits cheaper. Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.api_load import POST_BODY, ROOT, Servers, run_wrk, wait_http


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x8,3x8,4x8,2x16", help="workers x threads (or x g: gevent), comma separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    a = ap.parse_args(argv)
    shapes = [(int(s.split("x")[0]), s.split("x")[1]) for s in a.shapes.split(",")]
    if any(t == "g" for _, t in shapes):
        try:
            import gevent  # noqa: F401 - only whether it is there
        except ImportError:
            print("a gevent shape needs gevent: .venv/bin/pip install -c constraints.txt gevent", file=sys.stderr)
            return 2
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian: apt install wrk)", file=sys.stderr)
        return 2
    from tests.support.servers import free_port

    work = Path(tempfile.mkdtemp(prefix="qf-api-shapes-"))
    srv = Servers(work, 200)
    script = work / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(POST_BODY))}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    gunicorn = str(Path(sys.executable).parent / "gunicorn")

    def start(app: str, workers: int, threads: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        argv = [gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
        if threads == "g":
            argv += ["-k", "gevent", "--worker-connections", "1000", app]
        else:
            argv += ["--threads", threads, app]
        log = open(work / f"gunicorn-{port}.log", "wb")
        return subprocess.Popen(argv, env=srv.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), port

    try:
        print("| round | shape | ceiling rps | POST rps | ratio | POST p99 ms | load |")
        print("|---|---|---|---|---|---|---|")
        for n in range(a.rounds):
            for workers, threads in shapes:
                ceiling, cport = start("bench.api_ceiling:app", workers, threads)
                farm, fport = start("api.wsgi:app", workers, threads)
                try:
                    wait_http(cport, "/ping")
                    wait_http(fport, "/healthz")
                    c = run_wrk(f"http://127.0.0.1:{cport}/ping", duration=a.duration, connections=a.connections, headers={})
                    f = run_wrk(f"http://127.0.0.1:{fport}/v1/jobs", duration=a.duration, connections=a.connections,
                                headers={"Authorization": f"Bearer {srv.token}", "Content-Type": "application/json"}, script=script)
                finally:
                    for p in (ceiling, farm):
                        p.terminate()
                    for p in (ceiling, farm):
                        p.wait(15)
                print(f"| {n + 1} | {workers}x{threads} | {c['rps']:,.0f} | {f['rps']:,.0f} | {f['rps'] / c['rps']:.3f} | "
                      f"{f['p99_ms']:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)
    finally:
        srv.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
