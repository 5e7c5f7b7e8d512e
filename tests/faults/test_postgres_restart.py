"""PostgreSQL restarted while a job runs, on the compose-shaped processes.

The database is a cluster of the test's own (tests/support/servers.py), really
stopped and started again while the worker is between layers; the API is
gunicorn as compose runs it, polled throughout. Afterwards the idle worker hears
of a new job from the database again (its listening connection made anew).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.support.compose import ComposeStack

pytestmark = pytest.mark.slow

GPTQ = {"method": "gptq", "options": {"group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64}}


class Poller:
    """GET ``path`` every 50 ms on a thread; keep every status code and Retry-After seen."""

    def __init__(self, stack: ComposeStack, path: str):
        self.stack, self.path = stack, path
        self.seen: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            r = self.stack.get(self.path)
            self.seen.append((r.status_code, r.headers.get("Retry-After")))

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_worker_and_api_ride_through_a_postgres_restart(own_pg, own_db, own_redis, deep_llama, tmp_path):
    with ComposeStack(tmp_path, database_url=own_db, broker_url=own_redis.url, s3_url="http://127.0.0.1:9",
                      QUANTFARM_STORE="local", QUANTFARM_ARTIFACT_DIR=str(tmp_path / "store"), QUANTFARM_LOG_FORMAT="json") as stack:
        stack.start("api")
        stack.start("service")
        stack.start("worker-gpu0", name="worker")
        stack.wait_healthy()
        stack.first_admin_key()
        job_id = stack.post("/v1/jobs", json={"model": {"source": "local", "path": str(deep_llama)}, **GPTQ}).json()["id"]
        stack.wait_job(job_id, until=("running",), timeout=120)
        deadline = time.monotonic() + 120
        while (stack.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("layers_done", 0) < 2:
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.05)
        with Poller(stack, f"/v1/jobs/{job_id}") as poller:
            own_pg.restart(down_seconds=2.0)
            job = stack.wait_job(job_id, timeout=120)

        assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
        assert job["attempt"] == 1
        codes = {code for code, _ in poller.seen}
        assert codes <= {200, 503} and 503 in codes, poller.seen
        assert all(retry == "2" for code, retry in poller.seen if code == 503)
        lines = [json.loads(line) for line in stack.log("worker").read_text().splitlines() if line.startswith("{")]
        retries = [x for x in lines if "database unreachable" in x["message"]]
        assert retries, "the worker never waited for the database"  # it really rode through an outage
        # Lines the job causes (not a wake-up's or the poller's summary, which may name several jobs) name it.
        summaries = ("woken for", "found waiting work by")
        about_job = [x for x in lines if job_id in x["message"] and not x["message"].startswith(summaries)]
        untagged = [x for x in about_job + retries if (x.get("job_id"), x.get("attempt")) != (job_id, 1)]
        assert about_job and not untagged, untagged
        assert all(x["role"] == "worker" and x["level"] in ("info", "warning", "error") for x in lines)
        events = stack.get(f"/v1/jobs/{job_id}/events").json()["items"]
        assert sum(1 for e in events if e["to_status"] == "running") == 1
        progress = [e["data"] for e in events if e["kind"] == "progress"]
        assert [p["layers_done"] for p in progress] == list(range(1, 11))  # every layer once: none redone
        assert not any(p.get("resumed") for p in progress)
        # The poll is every 10 s: a job that starts sooner was announced to the worker's new listening connection.
        submitted = time.monotonic()
        after = stack.post("/v1/jobs", json={"model": {"source": "local", "path": str(deep_llama)}, **GPTQ, "reuse": False}).json()["id"]
        stack.wait_job(after, until=("running", "succeeded"), timeout=30)
        assert time.monotonic() - submitted < 5, stack.log("worker").read_text()[-3000:]
