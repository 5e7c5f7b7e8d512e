"""API load: wrk against the farm's gunicorn on PostgreSQL, side by side with a trivial Flask ceiling.

    .venv/bin/python -m bench.api_load [--duration 12] [--slices 3] [--warmup 2] [--connections 32] [--jobs 200] [--token KEY]
        [--no-write] [--no-auth]

Both servers run with the gunicorn arguments of ``docker-compose.yml`` and its
``gunicorn.conf.py`` (the table names the shape). The farm talks to PostgreSQL (``QUANTFARM_TEST_PG``'s server, a new
database with ``--jobs`` jobs) and a Redis of its own. Every endpoint, the ceiling
among them, is first warmed by an uncounted ``--warmup``-second run (a fresh
server's first second of submits ran at half the rate of the rest: connections,
prepared statements, lazily built validators). Each farm endpoint is then loaded
by ``wrk -t2 -c<connections>`` in ``--slices`` slices of ``--duration/--slices``
seconds, each beside a slice of the ceiling just as long, their order swapped
every round: its ratio is its requests over the ceiling's in those paired slices,
so a drift of the machine within the run (this host's ceiling moved by ±10% within
minutes) falls on both alike. Its maximum rate and p99 at saturation come from
its slices; then it is held at
half that rate by an open-loop client of our own (bench/openloop.c, built with the
system's C compiler; a Python client of a few processes where there is none): wrk
cannot hold a rate; latency counts from each request's scheduled send time, so a
stall is not hidden, and the client reports how late it sent itself, so a client that
fell behind is not taken for a slow server. ``--token`` (or
``QUANTFARM_BENCH_TOKEN``; default: an admin key the bench makes, since auth is
on as in compose) is sent as ``Authorization: Bearer`` to every farm call.
Results go into their own section of bench/RESULTS.md. The jobs do not change
while it runs, so after the warm-up GET one and a page's items are served from the
rows each API process keeps (storage/job_cache.py): the rates of polls that find
their jobs unchanged; a poll of a changed job reads its rows as before.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import ROOT, md_table, write_section

GOALS = {"get": 0.5, "list": 0.3, "post": 0.25, "healthz": 0.7}
P99_GOAL_MS = 50.0
BEGIN, END = "<!-- api_load:begin -->", "<!-- api_load:end -->"
POST_BODY = {"model": {"source": "local", "path": "/models/bench-tiny"}, "method": "rtn"}


def server_shape() -> str:
    """The compose API command's gunicorn shape in words: its workers, and their threads or gevent connections."""
    from tests.support.compose import compose_file

    argv = compose_file()["services"]["api"]["command"]
    opts = dict(zip(argv, argv[1:]))
    workers = opts.get("--workers", opts.get("-w", "1"))
    if opts.get("--worker-class", opts.get("-k")) == "gevent":
        return f"{workers} gevent workers of up to {int(opts.get('--worker-connections', 1000)):,} connections each"
    return f"{workers} workers x {opts.get('--threads', '1')} threads"


def gunicorn_argv(app: str, port: int) -> list[str]:
    """The compose file's API command, bound to ``port`` and serving ``app``."""
    from tests.support.compose import _argv, compose_file

    argv = _argv(compose_file()["services"]["api"]["command"], port)
    return [app if a == "api.wsgi:app" else a for a in argv]


def wait_http(port: int, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nothing healthy on :{port}{path}")


def parse_wrk(out: str) -> dict:
    def ms(v: str) -> float:
        num, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
        return float(num) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    seconds = float(done.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {"rps": rps, "p99_ms": p99, "requests": int(done.group(1)), "seconds": seconds,
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(0) if errors else ""}


def paired(ceiling: list[dict], endpoint: list[dict]) -> dict:
    """An endpoint's saturation from its slices (``parse_wrk``'s) and the ceiling's slices beside them: its rate over
    all its slices, its ratio (its requests a second over the ceiling's, each over its own slices), the ceiling's rate
    in those slices, the worst p99 of its slices and its failed responses."""
    def rate(runs: list[dict]) -> float:
        return sum(r["requests"] for r in runs) / sum(r["seconds"] for r in runs)

    rps, beside = rate(endpoint), rate(ceiling)
    return {"rps": rps, "ratio": rps / beside, "ceiling_rps": beside, "p99_ms": max(r["p99_ms"] for r in endpoint),
            "non_2xx": sum(r["non_2xx"] for r in endpoint), "slices": [r["rps"] for r in endpoint],
            "ceiling_slices": [r["rps"] for r in ceiling]}


def run_wrk(url: str, *, duration: int, connections: int, headers: dict[str, str], script: Path | None = None) -> dict:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


CLIENT_PROCESSES = 4  # the Python client's: one process's threads could not send more than ~1,500-2,000 requests a second here
HELD_CONNECTIONS = 64  # the C client's keep-alive connections (a request waits for a free one, counted from when it was due)
LAGGING_MS = 5.0  # a client whose median send is later than this behind schedule measured itself, not the server


def openloop_binary(work: Path) -> Path | None:
    """bench/openloop.c built into ``work`` with the system's C compiler, or None where there is none (or it fails)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = work / "openloop"
    if not exe.exists():
        done = subprocess.run([cc, "-O2", "-o", str(exe), str(ROOT / "bench" / "openloop.c")], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"bench/openloop.c did not build ({done.stderr.strip()[:300]}); the Python client holds the rate", file=sys.stderr)
            return None
    return exe


def open_loop(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str], rate: float, seconds: float,
              processes: int = CLIENT_PROCESSES, threads: int = 8, work: Path | None = None) -> dict:
    """Send ``rate`` requests a second on schedule; return p50/p99 measured from each request's scheduled time, and how
    late the client itself sent (``client_lag_p50_ms``: over ``LAGGING_MS``, the client could not keep the rate and the
    latencies are its own). With ``work`` and a C compiler: bench/openloop.c (one thread, epoll, ``HELD_CONNECTIONS``
    connections); otherwise ``processes`` Python processes of ``threads`` threads each."""
    exe = openloop_binary(work) if work is not None else None
    if exe is not None:
        argv = [str(exe), "-p", str(port), "-r", f"{rate:.3f}", "-d", f"{seconds:g}", "-c", str(HELD_CONNECTIONS), "-m", method]
        for k, v in headers.items():
            argv += ["-H", f"{k}: {v}"]
        if body is not None:
            bodyfile = work / f"openloop-body-{uuid.uuid4().hex}"
            bodyfile.write_bytes(body)
            argv += ["-b", str(bodyfile)]
        done = subprocess.run([*argv, path], capture_output=True, text=True, check=True, timeout=3 * seconds + 60)
        if done.stderr:
            print(f"{method} {path} at {rate:.0f} rps: {done.stderr.strip()}", file=sys.stderr)
        got = json.loads(done.stdout)
        return {"rate": rate, "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"], "failures": got["failures"],
                "requests": got["requests"], "client_lag_p50_ms": got["lag_p50_ms"], "client": "C"}
    import multiprocessing

    n = max(1, int(rate * seconds))
    start = time.time() + 0.5  # wall clock: the same schedule in every process
    args = [(port, method, path, body, headers, rate, start, range(k, n, processes), threads) for k in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_client, args)
    latencies = sorted(x for lat, _, _ in parts for x in lat)
    lags = sorted(x for _, lag, _ in parts for x in lag)
    return {"rate": rate, "p50_ms": latencies[len(latencies) // 2], "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
            "failures": sum(f for _, _, f in parts), "requests": n, "client_lag_p50_ms": lags[len(lags) // 2], "client": "Python"}


def _client(port, method, path, body, headers, rate, start, indices, threads) -> tuple[list[float], list[float], int]:
    """One client process: send the requests ``indices`` of the schedule; (latencies ms, send lags ms, failures)."""
    todo = iter(indices)
    lock = threading.Lock()
    latencies: list[float] = []
    lags: list[float] = []
    failures = [0]

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            due = start + i / rate
            time.sleep(max(0.0, due - time.time()))
            sent = time.time()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status < 400
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                ok = False
            with lock:
                latencies.append((time.time() - due) * 1000)
                lags.append((sent - due) * 1000)
                failures[0] += 0 if ok else 1

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, lags, failures[0]


class Listener:
    """An idle worker's listening connection on the farm's database (storage/notices.py, as workers/poller.py keeps
    one), on a thread of this process: the notices the submits' statements send are delivered to it, as they would
    be to the idle workers of a farm; ``heard`` counts the wake-ups it took (a wake-up takes every notice waiting)."""

    def __init__(self, url: str):
        from storage.db import Database
        from storage.notices import NewJobNotices

        self.db = Database(url)
        self.notices = NewJobNotices(self.db)
        self.heard = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "Listener":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.notices.wait(0.5, self._stop):
                self.heard += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.notices.close()
        self.db.dispose()


class Servers:
    """PostgreSQL database + Redis + both gunicorns + an idle worker's listener; ``close`` stops what it started."""

    def __init__(self, work: Path, jobs: int):
        from tests.conftest import PG_ADMIN, _admin_exec
        from tests.support.servers import RedisServer, free_port

        self.work, self.procs = work, []
        self._admin_exec = _admin_exec
        self.dbname = f"qf_bench_{uuid.uuid4().hex[:8]}"
        _admin_exec(f"CREATE DATABASE {self.dbname}")
        self.db_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.dbname}"
        self.redis = RedisServer().start()
        self.farm_port, self.ceiling_port, self.open_port = free_port(), free_port(), free_port()
        from quantfarm.secrets import new_key

        self.env = {**os.environ, "QUANTFARM_DATABASE_URL": self.db_url, "QUANTFARM_BROKER_URL": self.redis.url,
                    "QUANTFARM_STORE": "local", "QUANTFARM_HOME": str(work / "home"), "QUANTFARM_ARTIFACT_DIR": str(work / "store"),
                    "QUANTFARM_AUTH": "on", "QUANTFARM_SECRET_KEY": new_key(), "QUANTFARM_TRUSTED_HOSTS": "127.0.0.1,localhost",
                    "QUANTFARM_TEAM_MAX_QUEUED": "100000000", "QUANTFARM_LOCAL_ROOTS": "/models"}  # the bench queues far more jobs than a team's quota
        self.job_id, self.token = self._seed(jobs)
        self.listener: Listener | None = None

    def _seed(self, n: int) -> tuple[str, str]:
        """Migrate, make an admin key (auth is on, as in compose) and ``n`` jobs of its team; return a job id and the key."""
        from quantfarm.cli_access import create_key_locally
        from quantfarm.settings import Settings
        from quantfarm.spec import parse_spec, public_spec, spec_secrets
        from storage import jobs
        from storage.db import Database

        settings = Settings(database_url=self.db_url, secret_key=self.env["QUANTFARM_SECRET_KEY"])
        key = create_key_locally(settings, team="bench", role="admin", name="bench")  # migrates first
        db = Database.from_settings(settings)
        spec = parse_spec(POST_BODY)
        with db.session() as s:
            ids = [jobs.create_job(s, method="rtn", model_ref="local:/models/bench-tiny", spec=public_spec(spec), secrets=spec_secrets(spec),
                                   team_id=key["team_id"]).id for _ in range(n)]
        db.dispose()
        return ids[n // 2], key["key"]

    def start(self) -> None:
        # The same farm twice on one database: auth on (as compose runs it), and auth off (loopback), to price the key check.
        open_env = {**self.env, "QUANTFARM_AUTH": "off"}
        for app, port, env in (("api.wsgi:app", self.farm_port, self.env), ("bench.api_ceiling:app", self.ceiling_port, self.env),
                               ("api.wsgi:app", self.open_port, open_env)):
            log = open(self.work / f"gunicorn-{port}.log", "wb")
            self.procs.append(subprocess.Popen(gunicorn_argv(app, port), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        wait_http(self.farm_port, "/healthz")
        wait_http(self.ceiling_port, "/ping")
        wait_http(self.open_port, "/healthz")
        self.listener = Listener(self.db_url).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()
        self._admin_exec(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")


def endpoints(srv: Servers) -> list[tuple[str, str, int, str, str, bytes | None]]:
    """(key, label, port, method, path, body) for every row, the ceiling first."""
    return [
        ("ceiling", "trivial Flask GET (ceiling)", srv.ceiling_port, "GET", "/ping", None),
        ("get", "GET /v1/jobs/{id}", srv.farm_port, "GET", f"/v1/jobs/{srv.job_id}", None),
        ("list", "GET /v1/jobs?limit=20", srv.farm_port, "GET", "/v1/jobs?limit=20", None),
        ("post", "POST /v1/jobs", srv.farm_port, "POST", "/v1/jobs", json.dumps(POST_BODY).encode()),
        ("healthz", "GET /healthz", srv.farm_port, "GET", "/healthz", None),
    ]


def _wrk_args(token: str | None, work: Path, key: str, port: int, method: str, path: str,
              body: bytes | None) -> tuple[str, dict[str, str], Path | None]:
    """(url, headers, wrk script) for one endpoint: the key on every farm call, a script for a body."""
    headers = {"Authorization": f"Bearer {token}"} if token and key != "ceiling" else {}
    script = None
    if body is not None:
        script = work / f"{key}.lua"
        script.write_text(f'wrk.method = "{method}"\nwrk.body = {json.dumps(body.decode())}\nwrk.headers["Content-Type"] = "application/json"\n')
        headers = {**headers, "Content-Type": "application/json"}
    return f"http://127.0.0.1:{port}{path}", headers, script


def measure(srv: Servers, a, work: Path) -> list[dict]:
    token = a.token or os.environ.get("QUANTFARM_BENCH_TOKEN") or srv.token
    eps = endpoints(srv)
    args = {key: _wrk_args(token, work, key, port, method, path, body) for key, _label, port, method, path, body in eps}
    slice_s = max(1, round(a.duration / a.slices))

    def wrk(key: str, seconds: int) -> dict:
        url, headers, script = args[key]
        return run_wrk(url, duration=seconds, connections=a.connections, headers=headers, script=script)

    if a.warmup:
        for key, *_ in eps:
            wrk(key, a.warmup)
    ceiling_runs: list[dict] = []
    rows = []
    for key, label, port, method, path, body in eps[1:]:
        heard = srv.listener.heard
        mine, beside = [], []
        for n in range(a.slices):  # the ceiling first in even rounds, the endpoint first in odd ones
            for which in (("ceiling", key) if n % 2 == 0 else (key, "ceiling")):
                (beside if which == "ceiling" else mine).append(wrk(which, slice_s))
        wake_ups = srv.listener.heard - heard
        sat = paired(beside, mine)
        ceiling_runs += beside
        held = open_loop(port, method, path, body, args[key][1], rate=sat["rps"] / 2, seconds=a.duration, work=work)
        rows.append({"key": key, "label": label, **sat, "half_rate": held, "wake_ups": wake_ups})
        print(f"{label}: {sat['rps']:.0f} rps (slices {', '.join(f'{x:.0f}' for x in sat['slices'])}) beside the ceiling's "
              f"{sat['ceiling_rps']:.0f} (slices {', '.join(f'{x:.0f}' for x in sat['ceiling_slices'])}): {sat['ratio']:.2f}; "
              f"p99 {sat['p99_ms']:.1f} ms; at {held['rate']:.0f} rps p99 {held['p99_ms']:.1f} ms", flush=True)
    key, label, port, method, path, body = eps[0]
    ceiling = paired(ceiling_runs, ceiling_runs)
    held = open_loop(port, method, path, body, args[key][1], rate=ceiling["rps"] / 2, seconds=a.duration, work=work)
    print(f"{label}: {ceiling['rps']:.0f} rps over all its slices; at {held['rate']:.0f} rps p99 {held['p99_ms']:.1f} ms", flush=True)
    return [{"key": key, "label": label, **ceiling, "half_rate": held, "wake_ups": 0}, *rows]


AUTH_BEGIN, AUTH_END = "<!-- auth_overhead:begin -->", "<!-- auth_overhead:end -->"
AUTH_GOAL = 0.9  # auth on within 10% of auth off


def auth_overhead(srv: Servers, a, work: Path, token: str, rounds: int = 2) -> list[dict]:
    """Max rps of each farm endpoint with auth on (a Bearer key) and off, alternating on/off ``rounds`` times."""
    rows = []
    for key, label, _port, method, path, body in endpoints(srv)[1:4]:
        got: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(rounds):
            for mode, port, key_sent in (("on", srv.farm_port, token), ("off", srv.open_port, None)):
                url, headers, script = _wrk_args(key_sent, work, key, port, method, path, body)
                res = run_wrk(url, duration=a.duration, connections=a.connections, headers=headers, script=script)
                if res["non_2xx"]:
                    raise RuntimeError(f"{label} with auth {mode}: {res['non_2xx']} non-2xx responses")
                got[mode].append(res["rps"])
        on, off = sum(got["on"]) / rounds, sum(got["off"]) / rounds
        rows.append({"label": label, "on": on, "off": off, "ratio": on / off})
        print(f"auth overhead {label}: on {on:.0f} rps, off {off:.0f} rps, ratio {on / off:.2f}", flush=True)
    return rows


def render_auth(rows: list[dict], a, started: str, env: dict) -> str:
    table = [[r["label"], f"{r['on']:,.0f}", f"{r['off']:,.0f}", f"{r['ratio']:.2f}",
              "met" if r["ratio"] >= AUTH_GOAL else "**NOT met**"] for r in rows]
    cmd = f".venv/bin/python -m bench.api_load --duration {a.duration} --connections {a.connections} --jobs {a.jobs}"
    cmd, which = (f"{cmd} --only-auth", "") if a.only_auth else (cmd, " (the same run as the table above)")
    return "\n".join([
        AUTH_BEGIN, "## API load with auth on vs off", "",
        f"- Command: `{cmd}`{which}", f"- Date: {started}; machine: {env['cores']} cores, load average at start {env['load']}",
        "- One farm database, two gunicorns with the compose command: `QUANTFARM_AUTH=on` with an admin key in `Authorization: Bearer`, "
        f"and `QUANTFARM_AUTH=off`. Max rps by `wrk -t2 -c{a.connections} -d{a.duration}s`, on and off alternated twice and averaged. "
        f"Goal: auth on ≥ {AUTH_GOAL} of auth off.", "",
        md_table(["endpoint", "rps auth on", "rps auth off", "on / off", "goal ≥ 0.9"], table), "", AUTH_END,
    ])


def held_client(rows: list[dict]) -> str:
    """The open-loop client that held the rates, in words."""
    if all(r["half_rate"].get("client") == "C" for r in rows):
        return f"an open-loop client in C (bench/openloop.c: one thread, epoll, {HELD_CONNECTIONS} keep-alive connections)"
    return f"an open-loop client in Python ({CLIENT_PROCESSES} processes)"


def render(rows: list[dict], a, started: str, env: dict) -> str:
    table = []
    for r in rows:
        ratio = r["ratio"]
        goal = GOALS.get(r["key"])
        held = r["half_rate"]
        met = "—" if goal is None else ("met" if ratio >= goal else "**NOT met**")
        lag = held["client_lag_p50_ms"]
        if lag > LAGGING_MS:  # the client could not send at the rate: what it measured is itself
            p99_met = "not judged (client behind)"
        else:
            p99_met = "met" if held["p99_ms"] <= P99_GOAL_MS else "**NOT met**"
        bad = r["non_2xx"] + held["failures"]
        table.append([r["label"], f"{r['rps']:,.0f}", f"{r['ceiling_rps']:,.0f}", f"{ratio:.2f}", f"≥ {goal}" if goal else "", met, f"{r['p99_ms']:.0f}",
                      f"{held['rate']:,.0f}", f"{held['p50_ms']:.1f}", f"{held['p99_ms']:.1f}", f"{lag:.1f}", p99_met, str(bad)])
    headers = ["endpoint", "rps (max)", "ceiling rps beside it", "ratio to ceiling", "goal", "ratio goal", "p99 ms at saturation",
               "held rps (½ max)", "p50 ms held", "p99 ms held", "client send lag ms (p50)", "p99 ≤ 50 ms", "errors"]
    cmd = (f".venv/bin/python -m bench.api_load --duration {a.duration} --slices {a.slices} --warmup {a.warmup} "
           f"--connections {a.connections} --jobs {a.jobs}")
    slice_s = max(1, round(a.duration / a.slices))
    wake_ups = ", ".join(f"{r['wake_ups']:,} wake-ups during {r['label']}" for r in rows if r["key"] == "post")
    return "\n".join([
        BEGIN, "## API load: gunicorn on PostgreSQL vs a trivial Flask ceiling", "",
        f"- Command: `{cmd}`", f"- Date: {started}; machine: {env['cores']} cores, load average at start {env['load']}",
        f"- Both servers: the compose file's gunicorn command ({server_shape()}); the farm on PostgreSQL with {a.jobs} jobs "
        f"and a Redis of its own, auth on (every farm call carries an admin API key). Each endpoint warmed first by an uncounted "
        f"{a.warmup} s run. Saturation: `wrk -t2 -c{a.connections}` in {a.slices} slices of {slice_s} s, each beside a "
        "slice of the ceiling as long (their order swapped every round); the ratio is the endpoint's requests a second "
        "over the ceiling's in those paired slices, and the ceiling's row is all its slices. "
        f"Held: {held_client(rows)} at half the measured maximum, latency from each request's scheduled send time; "
        f"where the client's own median send lag passed {LAGGING_MS:g} ms it could not keep the rate, and the p99 is not judged.",
        "- An idle worker's listening connection (storage/notices.py) ran on the farm's database throughout: the submits' "
        f"inserts notified it ({wake_ups}; "
        "no broker message is sent for a submit on PostgreSQL).",
        *[f"- {note}" for note in a.note], "",
        md_table(headers, table), "", END,
    ])



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=12, help="seconds of saturation an endpoint (split into slices), and of the held run")
    ap.add_argument("--slices", type=int, default=3, help="slices of an endpoint's saturation, each beside a ceiling slice")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of an uncounted run of each endpoint first (0: none)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--token", help="API key sent as Authorization: Bearer (default: $QUANTFARM_BENCH_TOKEN)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only-auth", action="store_true", help="measure only auth on vs off")
    ap.add_argument("--no-auth", action="store_true", help="leave out auth on vs off (its section is left as it is)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results section (e.g. what else ran on the machine)")
    a = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    env = {"cores": os.cpu_count(), "load": ", ".join(f"{x:.2f}" for x in os.getloadavg())}
    work = Path(tempfile.mkdtemp(prefix="qf-api-load-"))
    srv = Servers(work, a.jobs)
    try:
        srv.start()
        rows = None if a.only_auth else measure(srv, a, work)
        auth_rows = None if a.no_auth else auth_overhead(srv, a, work, a.token or os.environ.get("QUANTFARM_BENCH_TOKEN") or srv.token)
    finally:
        srv.close()
        shutil.rmtree(work, ignore_errors=True)
    sections = ([(render(rows, a, started, env), BEGIN, END)] if rows is not None else [])
    if auth_rows is not None:
        sections.append((render_auth(auth_rows, a, started, env), AUTH_BEGIN, AUTH_END))
    for text, begin, end in sections:
        print(text)
        if not a.no_write:
            write_section(text, begin, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
