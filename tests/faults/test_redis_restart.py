"""Redis restarted while one job runs and others wait, on the compose-shaped processes.

The broker is a redis-server of the test's own without persistence
(tests/support/servers.py): stopping it loses every message, as a crash does.
A submit needs no broker on PostgreSQL (its insert notifies the idle workers:
storage/notices.py), so the jobs submitted while it is down must start within
about a lease period (idle workers also poll the database), the running one must
ride through, every job ends succeeded on its first attempt with each layer done
once, and the workers' broker consumers reconnect (a broker wake-up sent after
the restart reaches one).
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from quantfarm.queue import Dispatcher
from quantfarm.settings import Settings
from tests.support.compose import ComposeStack

pytestmark = pytest.mark.slow

# reuse off: the waiting jobs are identical and each must really run (not coalesce onto the first)
GPTQ = {"method": "gptq", "options": {"group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64}, "reuse": False}
LONG = {**GPTQ, "calibration": {"num_samples": 32, "seq_len": 128}}  # runs across the whole outage
POLL_SECONDS = 1.0


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def test_queued_jobs_start_again_and_all_succeed_after_a_redis_restart(own_db, own_redis, deep_llama, tmp_path):
    with ComposeStack(tmp_path, database_url=own_db, broker_url=own_redis.url, s3_url="http://127.0.0.1:9",
                      QUANTFARM_STORE="local", QUANTFARM_ARTIFACT_DIR=str(tmp_path / "store"),
                      QUANTFARM_WORKER_POLL_SECONDS=str(POLL_SECONDS)) as stack:
        stack.start("api")
        stack.start("service")
        stack.start("worker-gpu0", name="worker-a")
        stack.start("worker-gpu0", name="worker-b")
        stack.wait_healthy()
        stack.first_admin_key()
        model = {"source": "local", "path": str(deep_llama)}
        running = stack.post("/v1/jobs", json={"model": model, **LONG}).json()["id"]
        stack.wait_job(running, until=("running",), timeout=120)

        own_redis.stop()  # every message dies; submits meanwhile find no broker
        waiting, submitted = [], []
        for _ in range(2):
            r = stack.post("/v1/jobs", json={"model": model, **GPTQ})
            assert r.status_code == 201, r.text  # the row is the truth: accepted without a broker
            waiting.append(r.json()["id"])
            submitted.append(time.time())
        assert stack.get(f"/v1/jobs/{running}").json()["status"] == "running"
        own_redis.start()
        # No message names the waiting jobs: the idle worker hears of them from the database, within about a lease.
        stack.wait_job(waiting[0], until=("running", "succeeded"), timeout=6 + 2 * POLL_SECONDS)
        late = stack.post("/v1/jobs", json={"model": model, **GPTQ}).json()["id"]
        jobs = {j: stack.wait_job(j, timeout=240) for j in [running, *waiting, late]}

        for job_id, job in jobs.items():
            assert job["status"] == "succeeded" and job["attempt"] == 1, f"{job_id}: {job}\n{stack.logs()}"
            events = stack.get(f"/v1/jobs/{job_id}/events").json()["items"]
            assert sum(1 for e in events if e["to_status"] == "running") == 1, events
            progress = [e["data"] for e in events if e["kind"] == "progress"]
            assert [p["layers_done"] for p in progress] == list(range(1, 11))  # every layer once: none redone
            assert not any(p.get("resumed") for p in progress)
        started = {j: _at(next(e for e in stack.get(f"/v1/jobs/{j}/events").json()["items"] if e["to_status"] == "running"))
                   for j in jobs}
        ended = _at(next(e for e in stack.get(f"/v1/jobs/{running}/events").json()["items"] if e["to_status"] == "succeeded"))
        # ... not after the running one ended (a worker that finishes a job looks for the next one).
        assert started[waiting[0]] - submitted[0] <= 6 + 2 * POLL_SECONDS, (started, submitted)
        assert started[waiting[0]] < ended
        assert len({e.get("data", {}).get("owner") for j in jobs for e in stack.get(f"/v1/jobs/{j}/events").json()["items"]
                     if e["to_status"] == "running"}) == 2
        # The broker consumers reconnected: a wake-up sent through the new broker (as the sweeper sends) reaches a worker.
        queue = stack.env.get("QUANTFARM_QUEUE") or Settings.model_fields["queue"].default
        Dispatcher(Settings(home=tmp_path / "client", broker_url=own_redis.url, queue=queue)).run_job(late)
        deadline = time.monotonic() + 30
        while not any(f"woken for {late}" in stack.log(w).read_text() for w in ("worker-a", "worker-b")):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
