"""The real ``quantfarm`` command, run as a subprocess against the API served over HTTP.

The API runs in a werkzeug server thread of this test process, on SQLite, with a
recording stand-in for the broker (tests/api/conftest.py: RecordingDispatcher; the
broker is exercised for real in tests/api/test_dispatch_redis.py and tests/e2e).
There is no worker here: the tests move jobs through their states with the same
storage.jobs functions a worker calls (claim, set_stage, set_progress, transition).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import test_keyring
import requests
from sqlalchemy import select as sql_select

from api.app import build_server
from storage import jobs as job_store
from storage.artifacts import LocalStore
from storage.db import Database
from storage.models import Artifact, Job
from tests.api.conftest import MINIMAL, RecordingDispatcher, make_app

QUANTFARM = Path(sys.executable).parent / "quantfarm"


@dataclass
class Live:
    url: str
    db: Database
    store: LocalStore
    app: object
    env: dict
    seen: list


@pytest.fixture
def live(sqlite_url, tmp_path):
    db = Database(sqlite_url, keyring=test_keyring())
    store = LocalStore(tmp_path / "store")
    app = make_app(db, store, RecordingDispatcher(db), tmp_path)
    seen: list[tuple[str | None, str]] = []  # (route, method) of every request the API answered

    @app.after_request
    def _seen(resp):
        from flask import request

        seen.append((request.url_rule.rule if request.url_rule else None, request.method))
        return resp

    server = build_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTFARM_")}
    env.update(QUANTFARM_URL=url, QUANTFARM_HOME=str(tmp_path / "home"), COLUMNS="200")
    yield Live(url, db, store, app, env, seen)
    server.shutdown()
    server.server_close()
    db.dispose()


def cli(live: Live, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(QUANTFARM), *args], env=env or live.env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def start_cli(live: Live, *args: str, **kwargs) -> subprocess.Popen:
    opts = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
    return subprocess.Popen([str(QUANTFARM), *args], env=live.env, **opts)


def the_job(live: Live, timeout: float = 60) -> str:
    """Wait for the CLI to have created a job and return its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with live.db.session() as s:
            ids = list(s.scalars(sql_select(Job.id)))
        if ids:
            assert len(ids) == 1
            return ids[0]
        time.sleep(0.05)
    raise AssertionError("the CLI never created a job")


def watched(live: Live, job_id: str, timeout: float = 60) -> None:
    """Wait until the CLI has polled the job at least once (it is inside its watch loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ("/v1/jobs/<job_id>", "GET") in live.seen:
            return
        time.sleep(0.05)
    raise AssertionError("the CLI never polled the job")


def work(live: Live, job_id: str, outcome: job_store.JobStatus, **changes) -> None:
    """Do to the job what a worker would: claim, report stages and progress, finish."""
    db, owner = live.db, "test-worker"
    with db.session() as s:
        assert job_store.claim(s, job_id, owner, 60) is not None
    with db.session() as s:
        job_store.set_stage(s, job_id, owner, job_store.Stage.CALIBRATING)
    for done in (1, 2):
        with db.session() as s:
            job_store.set_progress(s, job_id, owner, done=done, total=2, eta=2.0 - done)
    with db.session() as s:
        job_store.transition(s, job_store.get_job(s, job_id), outcome, owner=owner, **changes)


def api_submit(live: Live, **overrides) -> dict:
    resp = requests.post(f"{live.url}/v1/jobs", json={**MINIMAL, **overrides}, timeout=10)
    assert resp.status_code == 201
    return resp.json()


def test_the_embedded_server_answers_polls_each_made_on_a_new_connection(live):
    """The embedded server (werkzeug) serves each connection on a thread that ends with it, and a client without a
    session (``requests.get``, a shell loop of curl) opens a connection a poll. The fast path's reads keep their
    database connection from one request to the next; kept a thread each, every ended thread's stayed checked out of
    the pool (15 at most on SQLite), and the 16th poll waited for one until it timed out. 30 polls, each answered with the job."""
    from storage import teams

    job_id = api_submit(live)["id"]
    with live.db.session() as s:  # with a key the fast path answers (without one, while no key exists, Flask does)
        key = teams.create_key(s, teams.ensure_default_team(s), role="admin", name="poller").key
    for n in range(30):
        resp = requests.get(f"{live.url}/v1/jobs/{job_id}", timeout=5,
                            headers={"Connection": "close", "Authorization": f"Bearer {key}"})
        assert (n, resp.status_code, resp.json()["id"]) == (n, 200, job_id)
    assert live.db.reader.pool.checkedout() <= 1


def test_submit_wait_exits_0_when_the_job_succeeds(live):
    proc = start_cli(live, "submit", "/models/tiny", "--method", "rtn", "--bits", "4", "--wait", "--poll-interval", "0.05")
    job_id = the_job(live)
    watched(live, job_id)
    work(live, job_id, job_store.JobStatus.SUCCEEDED)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == job_id
    assert f"succeeded: {job_id}" in err


def test_submit_wait_fails_with_the_error_code(live):
    proc = start_cli(live, "submit", "/models/empty", "--method", "gptq", "--wait", "--poll-interval", "0.05")
    job_id = the_job(live)
    watched(live, job_id)
    work(live, job_id, job_store.JobStatus.FAILED, error_code="not_a_model", error_message="/models/empty holds no model weights.")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out.strip() == job_id
    assert "error: not_a_model: /models/empty holds no model weights." in err


def test_ctrl_c_without_a_terminal_stops_watching_and_leaves_the_job(live):
    proc = start_cli(live, "submit", "/models/tiny", "--method", "rtn", "--wait", "--poll-interval", "0.05")
    job_id = the_job(live)
    watched(live, job_id)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"Stopped watching {job_id}; the job keeps going" in err
    assert requests.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "queued"


def _read_until(fd: int, text: bytes, timeout: float = 60) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 4096)
    assert text in seen, seen[-2000:]
    return seen


def test_ctrl_c_on_a_terminal_asks_and_can_cancel_the_job(live):
    """stdin and stderr on a pseudo-terminal, as when a person runs the command."""
    master, slave = pty.openpty()
    proc = start_cli(live, "submit", "/models/tiny", "--method", "rtn", "--wait", "--poll-interval", "0.05", stdin=slave, stderr=slave)
    os.close(slave)
    try:
        job_id = the_job(live)
        watched(live, job_id)
        proc.send_signal(signal.SIGINT)
        _read_until(master, b"only stop watching?")
        os.write(master, b"cancel\n")
        out, _ = proc.communicate(timeout=60)
        rest = _read_until(master, b"cancelled")
    finally:
        os.close(master)
    assert proc.returncode == 3
    assert out.strip() == job_id
    assert f"cancelled: {job_id}".encode() in re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", rest)
    assert requests.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "cancelled"


def test_submit_sends_every_option(live, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x * 2\n")
    res = cli(live, "submit", "org/llama@v2", "--method", "gptq", "--bits", "8", "--group-size", "64", "--no-sym", "--desc-act",
              "--option", "damp_percent=0.05", "--calib", str(calib), "--samples", "16", "--seq-len", "64", "--evaluate",
              "--hub-repo", "team/llama-gptq", "--webhook", "https://hooks.example/q", "--label", "team=nlp", "--priority", "2")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    spec = requests.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()["spec"]
    upload_id = spec["calibration"]["upload_id"]
    assert f"uploaded {calib} as {upload_id}" in res.stderr
    assert live.store.get_bytes(f"uploads/{upload_id}/calib.txt") == calib.read_bytes()
    assert spec["model"] == {"source": "hub", "repo_id": "org/llama", "revision": "v2"}
    assert spec["options"] == {"bits": 8, "group_size": 64, "sym": False, "desc_act": True, "static_groups": True,
                               "damp_percent": 0.05, "true_sequential": True,
                               "moe_calibration": "all_experts", "min_expert_tokens": 64}
    assert (spec["calibration"]["num_samples"], spec["calibration"]["seq_len"]) == (16, 64)
    assert spec["evaluate"] is True and spec["priority"] == 2 and spec["labels"] == {"team": "nlp"}
    assert spec["destination"]["hub"]["repo_id"] == "team/llama-gptq"
    assert spec["webhooks"] == [{"url": "https://hooks.example/***"}]


def test_submit_turns_default_on_options_off(live):
    """Act-order and evaluation are on by default; --no-desc-act and --no-evaluate send them off."""
    res = cli(live, "submit", "org/llama", "--method", "gptq", "--no-desc-act", "--no-evaluate")
    assert res.returncode == 0, res.stderr
    spec = requests.get(f"{live.url}/v1/jobs/{res.stdout.strip()}", timeout=10).json()["spec"]
    assert spec["options"]["desc_act"] is False and spec["evaluate"] is False
    res = cli(live, "submit", "org/llama", "--method", "gptq")
    spec = requests.get(f"{live.url}/v1/jobs/{res.stdout.strip()}", timeout=10).json()["spec"]
    assert spec["options"]["desc_act"] is True and spec["evaluate"] is True


def test_submit_sends_formats_and_a_bad_pair_names_the_valid_ones(live):
    res = cli(live, "submit", "org/llama", "--method", "rtn", "--format", "gptq", "--format", "compressed-tensors")
    assert res.returncode == 0, res.stderr
    spec = requests.get(f"{live.url}/v1/jobs/{res.stdout.strip()}", timeout=10).json()["spec"]
    assert spec["formats"] == ["gptq", "compressed-tensors"]
    bad = cli(live, "submit", "org/llama", "--method", "awq", "--format", "gptq")
    assert bad.returncode != 0 and "awq cannot write 'gptq'; it writes: awq, compressed-tensors" in bad.stderr


def test_submit_validation_error_names_the_field(live):
    res = cli(live, "submit", "/models/tiny", "--method", "gptq", "--bits", "5")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "error: validation_error: The request has invalid fields: options.bits.",
        "  options.bits: Input should be 2, 3, 4 or 8",
    ]
    assert res.stdout == ""
    with live.db.session() as s:
        assert list(s.scalars(sql_select(Job.id))) == []


def test_status_json_parses_and_summary_shows_the_error(live):
    job_id = api_submit(live)["id"]
    work(live, job_id, job_store.JobStatus.FAILED, error_code="unsupported_architecture", error_message="BertModel [/encoder] is not a decoder.")
    res = cli(live, "status", job_id, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == requests.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()
    summary = cli(live, "status", job_id)
    assert summary.returncode == 0
    assert "failed" in summary.stdout and "unsupported_architecture: BertModel [/encoder] is not a decoder." in summary.stdout
    assert "layer 2/2 (100%)" in summary.stdout


def test_status_summary_of_a_finished_job(live):
    job_id = api_submit(live)["id"]
    work(live, job_id, job_store.JobStatus.SUCCEEDED, metrics={"perplexity_before": 9.1, "layer_loss": [0.1, 0.2]})
    with live.db.session() as s:
        s.add(Artifact(id="art_cli", job_id=job_id, kind="model", format="gptq", location="file:///store/jobs/x/artifact",
                       files=[], file_count=7, size_bytes=70_000, sha256="0" * 64))
    res = cli(live, "status", job_id)
    assert res.returncode == 0, res.stderr
    assert "perplexity_before  9.1" in res.stdout and "layer_loss" not in res.stdout
    assert "art_cli  gptq  7 files  70.0 kB  file:///store/jobs/x/artifact" in res.stdout


def test_jobs_lists_a_table(live):
    ids = [api_submit(live)["id"] for _ in range(3)]
    requests.post(f"{live.url}/v1/jobs/{ids[0]}/cancel", timeout=10)
    res = cli(live, "jobs")
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "job_" in line]
    assert [next(w for w in line.split() if w.startswith("job_")) for line in rows] == ids[::-1]
    assert "cancelled" in rows[-1] and "local:/models/tiny-llama" in rows[0]
    only = cli(live, "jobs", "--status", "cancelled", "--json")
    assert [j["id"] for j in json.loads(only.stdout)["items"]] == [ids[0]]


def test_cancel_and_retry(live):
    job_id = api_submit(live)["id"]
    res = cli(live, "cancel", job_id)
    assert (res.returncode, res.stdout.strip()) == (0, f"{job_id} cancelled")
    again = cli(live, "cancel", job_id)
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: invalid_state: Job {job_id} is cancelled")
    retry = cli(live, "retry", job_id)
    assert (retry.returncode, retry.stdout.strip()) == (0, f"{job_id} queued again (attempt 2)")
    missing = cli(live, "status", "job_nope")
    assert missing.returncode == 1 and missing.stderr.startswith("error: not_found: No job with id 'job_nope'")


def test_connection_refused_names_the_url(live):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    res = cli(live, "--url", url, "jobs")
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: connection_failed: could not reach the Quantfarm API at {url}")
    env = {**live.env, "QUANTFARM_URL": url}
    assert f"at {url}" in cli(live, "status", "job_x", env=env).stderr


def test_a_malformed_option_is_a_usage_error_and_submits_nothing(live):
    res = cli(live, "submit", "/models/tiny", "--method", "gptq", "--option", "damp_percent")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: bad_argument: --option takes key=value, got 'damp_percent'"
    with live.db.session() as s:
        assert list(s.scalars(sql_select(Job.id))) == []


def test_an_address_that_is_not_the_api_is_named_not_a_traceback(live, tmp_path):
    """A plain HTTP server answering 200 with an HTML page, as a wrong QUANTFARM_URL would."""
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"<html>not the farm</html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = cli(live, "--url", f"http://127.0.0.1:{server.server_port}", "jobs")
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 1
    assert res.stderr.startswith("error: bad_response: ") and "not JSON (text/html)" in res.stderr
    assert "Traceback" not in res.stderr


def test_submit_wait_on_a_terminal_draws_stage_layers_and_eta(live):
    """stderr on a pseudo-terminal, so rich draws its live bar as a person sees it."""
    master, slave = pty.openpty()
    proc = start_cli(live, "submit", "/models/tiny", "--method", "rtn", "--wait", "--poll-interval", "0.05", stderr=slave)
    os.close(slave)
    seen = b""
    try:
        job_id = the_job(live)
        watched(live, job_id)
        db, owner = live.db, "test-worker"
        with db.session() as s:
            assert job_store.claim(s, job_id, owner, 60) is not None
        with db.session() as s:
            job_store.set_stage(s, job_id, owner, job_store.Stage.CALIBRATING)
        for done in (1, 2, 3):
            with db.session() as s:
                job_store.set_progress(s, job_id, owner, done=done, total=4, eta=90.0 * (4 - done))
            seen += _read_until(master, f"layer {done}/4".encode())
        with db.session() as s:
            job_store.transition(s, job_store.get_job(s, job_id), job_store.JobStatus.SUCCEEDED, owner=owner)
        proc.wait(timeout=60)
        seen += _read_until(master, b"succeeded")
    finally:
        os.close(master)
    assert proc.returncode == 0
    screen = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", seen).decode(errors="replace")
    assert "calibrating (attempt 1)" in screen
    assert "layer 1/4" in screen and "ETA 4m30s" in screen  # 3 layers left x 90 s
    assert "layer 3/4" in screen and "ETA 1m30s" in screen


def test_keys_and_teams_from_the_cli(live, sqlite_url, tmp_path):
    """The first admin key is made with --local; then teams and keys go through the API with QUANTFARM_API_KEY."""
    local_env = {**live.env, "QUANTFARM_DATABASE_URL": sqlite_url, "QUANTFARM_SECRET_KEY": "quantfarm-test-secret-key-0001"}
    made = cli(live, "keys", "create", "--local", "--team", "ops", "--role", "admin", "--name", "root", env=local_env)
    assert made.returncode == 0, made.stderr
    admin_key = made.stdout.splitlines()[0]
    assert admin_key.startswith("qf_key_") and "not shown again" in made.stdout
    # A key now exists: the loopback API stops acting as the local admin for keyless callers.
    denied = cli(live, "jobs")
    assert denied.returncode == 1 and "unauthorized" in denied.stderr
    env = {**live.env, "QUANTFARM_API_KEY": admin_key}
    assert cli(live, "teams", "create", "nlp", "--max-queued", "3", env=env).returncode == 0
    listed = cli(live, "teams", "list", "--json", env=env)
    assert {t["name"]: t["max_queued"] for t in json.loads(listed.stdout)["items"]}["nlp"] == 3
    member = cli(live, "keys", "create", "--team", "nlp", "--role", "member", env=env)
    assert member.returncode == 0, member.stderr
    member_key = member.stdout.splitlines()[0]
    keys = json.loads(cli(live, "keys", "list", "--json", env=env).stdout)["items"]
    nlp_key = next(k for k in keys if k["team"] == "nlp")
    assert member_key not in json.dumps(keys)
    member_env = {**live.env, "QUANTFARM_API_KEY": member_key}
    assert cli(live, "jobs", env=member_env).returncode == 0
    assert cli(live, "keys", "revoke", nlp_key["id"], env=env).returncode == 0
    gone = cli(live, "jobs", env=member_env)
    assert gone.returncode == 1 and "unknown or revoked" in gone.stderr
