"""Production shape: PostgreSQL + Redis broker + a real Celery worker process.

The API runs in-process (Flask test client) with a real Dispatcher; the worker
is `python -m workers` in a subprocess, exactly as `quantfarm worker` starts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from quantfarm.queue import Dispatcher
from quantfarm.settings import Settings
from storage.db import Database
from tests.conftest import REDIS_URL, _truncate

pytestmark = pytest.mark.slow


@pytest.fixture
def prod(pg_url, tmp_path):
    db_index = 13
    broker = REDIS_URL.rsplit("/", 1)[0] + f"/{db_index}"
    redis.Redis.from_url(broker).flushdb()
    env = {
        "QUANTFARM_HOME": str(tmp_path / "home"),
        "QUANTFARM_DATABASE_URL": pg_url,
        "QUANTFARM_BROKER_URL": broker,
        "QUANTFARM_ARTIFACT_DIR": str(tmp_path / "store"),
        "QUANTFARM_QUEUE": f"qf-test-{uuid.uuid4().hex[:8]}",
        "QUANTFARM_LEASE_SECONDS": "4",
        "QUANTFARM_HEARTBEAT_SECONDS": "1",
        "QUANTFARM_TORCH_THREADS": "1",
    }
    settings = Settings(
        home=tmp_path / "home", database_url=pg_url, broker_url=broker, artifact_dir=tmp_path / "store",
        queue=env["QUANTFARM_QUEUE"], lease_seconds=4,
    )
    db = Database(pg_url)
    _truncate(db)
    workers: list[subprocess.Popen] = []

    def start_worker() -> subprocess.Popen:
        log = open(tmp_path / f"worker{len(workers)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "workers"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        workers.append(p)
        return p

    from api.app import create_app

    app = create_app(settings, db=db)
    yield settings, db, app.test_client(), start_worker, tmp_path
    for p in workers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    db.dispose()


def wait(client, job_id, until=("succeeded", "failed", "cancelled"), timeout=180, logs: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    tail = "".join(p.read_text()[-3000:] for p in sorted(logs.glob("worker*.log"))) if logs else ""
    raise TimeoutError(f"job {job_id} is {job['status']}\n{tail}")


def test_job_runs_through_redis_and_postgres(prod, tiny_llama):
    settings, db, client, start_worker, tmp = prod
    start_worker()
    r = client.post("/v1/jobs", json={"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    assert r.status_code == 201
    job_id = r.get_json()["id"]
    job = wait(client, job_id, logs=tmp)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1 and len(job["artifacts"]) == 1
    # A duplicate delivery of the same message (as Redis does after its visibility timeout) is harmless.
    Dispatcher(settings).run_job(job_id)
    time.sleep(3)
    events = client.get(f"/v1/jobs/{job_id}/events").get_json()
    events = events["items"] if isinstance(events, dict) else events
    assert sum(1 for e in events if e["to_status"] == "running") == 1
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "succeeded"


def test_killed_worker_is_swept_and_another_worker_finishes(prod, tokenizer_dir):
    from tests.conftest import CACHE
    from tests.support.models import make_tiny_model
    from workers.sweeper import Sweeper

    settings, db, client, start_worker, tmp = prod
    model = make_tiny_model(CACHE / "deep-llama-10", "llama", tokenizer_dir=tokenizer_dir, layers=10)
    first = start_worker()
    body = {"model": {"source": "local", "path": str(model)}, "method": "gptq", "calibration": {"num_samples": 8, "seq_len": 64}}
    job_id = client.post("/v1/jobs", json=body).get_json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        if job["progress"] and job["progress"]["layers_done"] >= 2:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    start_worker()
    sweeper = Sweeper(settings, db, Dispatcher(settings))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the lease (4 s) must expire before the sweeper requeues
        if sweeper.sweep_once()["requeued"]:
            break
        time.sleep(0.5)
    job = wait(client, job_id, logs=tmp)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2 and len(job["artifacts"]) == 1
