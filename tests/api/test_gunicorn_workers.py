"""gunicorn as compose starts it spreads keep-alive connections over its workers (gunicorn.conf.py: ``reuse_port``)."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
from collections import Counter

import pytest

from tests.conftest import REDIS_URL
from tests.support.compose import ComposeStack

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")


def _sockets(state: str, port: int) -> list[list[str]]:
    """The pids owning each TCP socket on local ``port`` in ``state`` (``ss``), a list a socket."""
    out = subprocess.run(["ss", "-tnpH", "state", state, f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [re.findall(r"pid=(\d+)", line) for line in out.splitlines() if line.strip()]


@pytest.mark.slow
def test_each_worker_listens_on_its_own_socket_and_keep_alive_connections_reach_both(pg_url, tmp_path):
    """Two workers, two listening sockets, one each; 32 keep-alive connections opened at once (as a load balancer
    or wrk keeps them) are spread over both workers, each with a share it can serve on its threads. On one shared
    socket a burst could land on one worker only (its one core serving every request)."""
    broker = REDIS_URL.rsplit("/", 1)[0] + "/12"
    with ComposeStack(tmp_path, database_url=pg_url, broker_url=broker, s3_url="http://127.0.0.1:9",
                      QUANTFARM_STORE="local") as stack:
        stack.start("api")
        stack.wait_healthy()
        port = int(stack.url.rsplit(":", 1)[1])
        listening = _sockets("listening", port)
        assert len(listening) == 2 and all(len(pids) == 1 for pids in listening), listening
        workers = {pids[0] for pids in listening}
        assert len(workers) == 2
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(32)]
        try:
            for c in conns:
                c.connect()
            for c in conns:
                c.request("GET", "/healthz")
            assert [c.getresponse().read() and c.sock is not None for c in conns] == [True] * 32  # kept alive
            per_worker = Counter(pids[0] for pids in _sockets("established", port))
            assert set(per_worker) == workers and sum(per_worker.values()) == 32, per_worker
            assert min(per_worker.values()) >= 4, per_worker  # hashed: fewer than 4 of 32 is a one-in-a-million split
        finally:
            for c in conns:
                c.close()


@pytest.mark.slow
def test_the_apis_log_lines_under_gunicorn_are_json_and_name_the_job(pg_url, tmp_path):
    """``QUANTFARM_LOG_FORMAT=json`` reaches gunicorn's workers (api/wsgi.py sets up their logging): a submit's and a
    cancel's lines are JSON objects with the role, and the job's id and attempt as fields. Before, the API's INFO
    lines were dropped under gunicorn (no handler but Python's last resort, warnings only)."""
    import json
    import time

    broker = REDIS_URL.rsplit("/", 1)[0] + "/12"
    model = tmp_path / "model"
    model.mkdir()
    with ComposeStack(tmp_path, database_url=pg_url, broker_url=broker, s3_url="http://127.0.0.1:9",
                      QUANTFARM_STORE="local", QUANTFARM_LOG_FORMAT="json") as stack:
        stack.start("api")
        stack.wait_healthy()
        stack.first_admin_key()
        r = stack.post("/v1/jobs", json={"model": {"source": "local", "path": str(model)}, "method": "rtn"})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert stack.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

        def about_job() -> list[dict]:
            lines = [json.loads(x) for x in stack.log("api").read_text().splitlines() if x.startswith("{")]
            return [x for x in lines if job_id in x["message"]]

        deadline = time.monotonic() + 10
        while len(about_job()) < 2:
            assert time.monotonic() < deadline, stack.log("api").read_text()[-3000:]
            time.sleep(0.1)
        lines = about_job()
        assert [x["message"].split(" ", 1)[0] for x in lines] == ["Created", "Cancel"]
        assert all((x["role"], x["level"], x["job_id"], x["attempt"]) == ("api", "info", job_id, 1) for x in lines), lines
