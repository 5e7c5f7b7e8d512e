"""Where the CPU goes under load: each process kind's CPU per request while wrk saturates one endpoint.

    .venv/bin/python -m bench.api_cpu [--duration 8] [--only ceiling,get,list,post,healthz] [--async-commit] [--machine]

Starts the servers of bench/api_load.py (the compose gunicorn command for the farm and
the trivial ceiling, PostgreSQL with 200 jobs, a Redis of its own), runs
``wrk -t2 -c32`` against each endpoint, and reads every process's user+system CPU
from /proc before and after: the farm's gunicorn, the ceiling's, PostgreSQL (its
backends and background processes), Redis, and everything else on the machine
("other": on a shared machine, other sessions' work). ``--async-commit`` sets
``synchronous_commit = off`` on the bench database (a diagnostic: the farm never does).
``--machine`` prints, for each endpoint, the whole machine's time per request:
user and system CPU of each process kind (PostgreSQL's backends apart from its
WAL writer and other background processes, wrk apart from the rest), the
machine's idle and iowait time (/proc/stat), the farm's context switches, and
PostgreSQL's commits and WAL writes and syncs (pg_stat_database, pg_stat_wal).
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
_PG_BACKGROUND = ("checkpointer", "background writer", "autovacuum", "launcher", "archiver", "stats", "logger", "walreceiver")


def cpu_by_process(detail: bool = False) -> dict[str, tuple[str, float, str]]:
    """pid -> (kind, CPU seconds, command line) for every process readable now.

    ``detail``: pid -> (kind, (user seconds, system seconds, voluntary and involuntary switches, seconds runnable but
    waiting for a CPU), command line), with
    PostgreSQL's backends ("postgres backend"), its WAL writer and its other processes apart.
    """
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
        if detail:
            seconds = (int(fields[11]) / HZ, int(fields[12]) / HZ, *_switches(pid))
        if "postgres" in cmd and detail:
            kind = ("postgres walwriter" if "walwriter" in cmd else "postgres walsender" if "walsender" in cmd
                    else "postgres backend" if cmd.startswith("postgres: ") and not any(w in cmd for w in _PG_BACKGROUND)
                    else "postgres other")
        elif "postgres" in cmd:
            kind = "postgres"
        elif "gunicorn" in cmd:
            kind = "farm" if "api.wsgi" in cmd else "ceiling"
        elif "redis-server" in cmd:
            kind = "redis"
        else:
            kind = "other"
        out[pid] = (kind, seconds, cmd[:80])
    return out


def _switches(pid: str) -> tuple[int, int, float]:
    """Voluntary and involuntary context switches of all of ``pid``'s threads, and their seconds waiting for a CPU
    while runnable (schedstat's run-queue wait)."""
    vol = invol = 0
    queued = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                queued += int(f.read().split()[1]) / 1e9
    except OSError:
        pass
    return vol, invol, queued


def machine_times() -> dict[str, float]:
    """The machine's CPU seconds by state, summed over its CPUs (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        values = [int(v) / HZ for v in f.readline().split()[1:9]]
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), values))


def pg_counters(url: str) -> dict[str, int]:
    """The bench database's commits, the server's WAL records, writes and syncs so far."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        [(commits,)] = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        [(records, writes, syncs)] = conn.execute("SELECT wal_records, wal_write, wal_sync FROM pg_stat_wal")
    return {"commits": commits, "wal_records": records, "wal_writes": writes, "wal_syncs": syncs}


def machine_report(label: str, rps: float, elapsed: float, before: dict, after: dict, m0: dict, m1: dict,
                   pg0: dict, pg1: dict) -> str:
    """The machine's time per request during one endpoint's wrk run, by process kind and state (µs)."""
    n = rps * elapsed
    kinds: dict[str, list[float]] = {}
    for pid, (kind, now, _) in after.items():
        then = before.get(pid, (kind, (0.0, 0.0, 0, 0, 0.0), ""))[1]
        got = kinds.setdefault(kind, [0.0, 0.0, 0, 0, 0.0])
        for i in range(5):
            got[i] += now[i] - then[i]
    cpus = os.cpu_count()
    wall = sum(m1.values()) - sum(m0.values())  # every CPU's seconds in the interval
    lines = [f"{label}: {rps:.0f} rps over {elapsed:.1f} s on {cpus} CPUs = {wall / n * 1e6:,.0f} CPU-µs of machine a request;"
             f" load {os.getloadavg()[0]:.1f}"]
    for kind, (user, system, vol, invol, queued) in sorted(kinds.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        if user + system > 0.005 or kind == "farm":
            lines.append(f"  {kind:18s} user {user / n * 1e6:6,.0f}  sys {system / n * 1e6:6,.0f}  µs a request;"
                         f" waiting for a CPU {queued / n * 1e6:6,.0f} µs; switches: {vol / n:.1f} voluntary,"
                         f" {invol / n:.1f} involuntary")
    state = {k: (m1[k] - m0[k]) / n * 1e6 for k in m0}
    lines.append("  machine by state, µs a request: " + ", ".join(f"{k} {v:,.0f}" for k, v in state.items() if v >= 0.5))
    lines.append(f"  machine idle {100 * (state['idle'] + state['iowait']) * n / 1e6 / wall:.0f}% (idle + iowait)")
    d = {k: pg1[k] - pg0[k] for k in pg0}
    lines.append(f"  PostgreSQL: {d['commits'] / n:.2f} commits, {d['wal_records'] / n:.1f} WAL records, "
                 f"{d['wal_writes'] / n:.2f} WAL writes, {d['wal_syncs'] / n:.2f} WAL syncs a request")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--only", default="ceiling,get,list,post,healthz")
    ap.add_argument("--async-commit", action="store_true")
    ap.add_argument("--machine", action="store_true", help="the whole machine's time per request, by kind and state")
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
            if a.machine:
                pg0, m0, before, c0, t0 = pg_counters(srv.db_url), machine_times(), cpu_by_process(True), os.times(), time.time()
                res = run_wrk(f"http://127.0.0.1:{port}{path}", duration=a.duration, connections=32, headers=headers,
                              script=script)
                c1, after, m1, elapsed = os.times(), cpu_by_process(True), machine_times(), time.time() - t0
                pg1 = pg_counters(srv.db_url)
                # wrk has exited (and been waited for) by now: its CPU is this process's children's.
                after["wrk"] = ("wrk", (c1.children_user - c0.children_user, c1.children_system - c0.children_system, 0, 0, 0.0), "")
                print(machine_report(label, res["rps"], elapsed, before, after, m0, m1, pg0, pg1), flush=True)
                continue
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
