"""Where the CPU goes under load: each process kind's CPU per request while wrk saturates one endpoint.

    .venv/bin/python -m bench.api_cpu [--duration 8] [--only ceiling,get,list,post,healthz] [--async-commit]

Starts the servers of bench/api_load.py (the compose gunicorn command for the farm and
the trivial ceiling, PostgreSQL with 200 jobs, a Redis of its own), runs
``wrk -t2 -c32`` against each endpoint, and reads every process's user+system CPU
from /proc before and after: the farm's gunicorn, the ceiling's, PostgreSQL (its
backends and background processes), Redis, and everything else on the machine
("other": on a shared machine, other sessions' work). ``--async-commit`` sets
``synchronous_commit = off`` on the bench database (a diagnostic: the farm never does).
Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.api_load import Servers, endpoints, run_wrk

HZ = os.sysconf("SC_CLK_TCK")


def cpu_by_process() -> dict[str, tuple[str, float, str]]:
    """pid -> (kind, CPU seconds, command line) for every process readable now."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / HZ  # utime + stime
        if "postgres" in cmd:
            kind = "postgres"
        elif "gunicorn" in cmd:
            kind = "farm" if "api.wsgi" in cmd else "ceiling"
        elif "redis-server" in cmd:
            kind = "redis"
        else:
            kind = "other"
        out[pid] = (kind, seconds, cmd[:80])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--only", default="ceiling,get,list,post,healthz")
    ap.add_argument("--async-commit", action="store_true")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qf-api-cpu-"))
    srv = Servers(work, 200)
    if a.async_commit:
        srv._admin_exec(f"ALTER DATABASE {srv.dbname} SET synchronous_commit = off")
    try:
        srv.start()
        for key, label, port, method, path, body in endpoints(srv):
            if key not in a.only.split(","):
                continue
            headers = {"Authorization": f"Bearer {srv.token}"} if key != "ceiling" else {}
            script = None
            if body is not None:
                script = work / f"{key}.lua"
                script.write_text(f'wrk.method = "{method}"\nwrk.body = {json.dumps(body.decode())}\n'
                                  'wrk.headers["Content-Type"] = "application/json"\n')
            before, t0 = cpu_by_process(), time.time()
            res = run_wrk(f"http://127.0.0.1:{port}{path}", duration=a.duration, connections=32, headers=headers, script=script)
            after, elapsed = cpu_by_process(), time.time() - t0
            n = res["rps"] * elapsed
            kinds: dict[str, float] = {}
            for pid, (kind, seconds, _) in after.items():
                kinds[kind] = kinds.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0, ""))[1]
            per = {k: round(v / n * 1e6) for k, v in sorted(kinds.items()) if v > 0.01}
            print(f"{label}: {res['rps']:.0f} rps, load {os.getloadavg()[0]:.1f}; CPU µs per request by process kind: {per}",
                  flush=True)
    finally:
        srv.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
