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
from tests.conftest import REDIS_URL, TEST_SECRET_KEY, _truncate, test_keyring

pytestmark = pytest.mark.slow


@pytest.fixture
def prod(pg_url, tmp_path):
    # The worker's database poll waits 10 minutes: only the submit's notice (its INSERT's, storage/notices.py) can start
    # a job in this test.
    yield from _prod(pg_url, tmp_path, {"QUANTFARM_WORKER_POLL_SECONDS": "600"})


def _prod(pg_url, tmp_path, extra_env):
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
        "QUANTFARM_SECRET_KEY": TEST_SECRET_KEY,
        **extra_env,
    }
    settings = Settings(**{k[len("QUANTFARM_"):].lower(): v for k, v in env.items()})
    db = Database(pg_url, keyring=test_keyring())
    _truncate(db)
    workers: list[subprocess.Popen] = []

    def start_worker(scratch: str | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"worker{len(workers)}.log", "wb")
        wenv = {**os.environ, **env}
        if scratch:
            wenv["QUANTFARM_SCRATCH_DIR"] = str(tmp_path / f"scratch-{scratch}")
        p = subprocess.Popen([sys.executable, "-m", "workers"], env=wenv, stdout=log, stderr=subprocess.STDOUT)
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


@pytest.fixture
def prod_s3(pg_url, tmp_path):
    """Like ``prod`` but the store is S3 (moto_server) and each worker gets its own scratch dir."""
    import boto3

    from tests.support.s3server import MotoServer

    with MotoServer() as moto:
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t").create_bucket(Bucket="farm")
        s3env = {"QUANTFARM_STORE": "s3", "QUANTFARM_S3_ENDPOINT_URL": moto.url, "QUANTFARM_S3_BUCKET": "farm",
                 "QUANTFARM_S3_ACCESS_KEY_ID": "t", "QUANTFARM_S3_SECRET_ACCESS_KEY": "t"}
        gen = _prod(pg_url, tmp_path, s3env)
        settings, db, client, start_worker, tmp = next(gen)

        def bucket_keys(prefix):
            c = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t")
            return {o["Key"] for o in c.list_objects_v2(Bucket="farm", Prefix=prefix).get("Contents", [])}

        yield settings, db, client, start_worker, tmp, bucket_keys
        next(gen, None)


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
    deadline = time.monotonic() + 120
    while b" ready." not in (tmp / "worker0.log").read_bytes():  # Celery consumes; the poller has looked once
        assert time.monotonic() < deadline, (tmp / "worker0.log").read_text()[-3000:]
        time.sleep(0.2)
    r = client.post("/v1/jobs", json={"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    assert r.status_code == 201
    job_id = r.get_json()["id"]
    job = wait(client, job_id, logs=tmp)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1 and len(job["artifacts"]) == 1
    # Started at the database's notice of the new job (workers/poller.py logs it once the job ended), not by the poll.
    woken = f"found waiting work by the database's notice of new jobs; ran [('{job_id}', 'succeeded')]"
    deadline = time.monotonic() + 30
    while woken not in (tmp / "worker0.log").read_text():
        assert time.monotonic() < deadline, (tmp / "worker0.log").read_text()[-3000:]
        time.sleep(0.2)
    # A broker wake-up (the sweeper's and a requeue's; Redis redelivers one after its visibility timeout) reaches the
    # worker through Celery, and one for a job that already ran is harmless.
    Dispatcher(settings).run_job(job_id)
    deadline = time.monotonic() + 30
    while f"woken for {job_id}; ran nothing" not in (tmp / "worker0.log").read_text():
        assert time.monotonic() < deadline, (tmp / "worker0.log").read_text()[-3000:]
        time.sleep(0.2)
    events = client.get(f"/v1/jobs/{job_id}/events").get_json()
    events = events["items"] if isinstance(events, dict) else events
    assert sum(1 for e in events if e["to_status"] == "running") == 1
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "succeeded"


def test_killed_worker_resumes_on_another_worker_from_s3_checkpoints(prod_s3, deep_llama):
    """Worker A is killed mid-job; worker B, a different process with an empty scratch dir,
    resumes from the checkpoints in S3 (moto_server) and writes byte-identical files."""
    from workers.sweeper import Sweeper

    settings, db, client, start_worker, tmp, bucket_keys = prod_s3
    body = {"model": {"source": "local", "path": str(deep_llama)}, "method": "gptq",
            "options": {"group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64}}
    first = start_worker(scratch="a")
    reference = wait(client, client.post("/v1/jobs", json=body).get_json()["id"], logs=tmp)
    assert reference["status"] == "succeeded"

    job_id = client.post("/v1/jobs", json={**body, "reuse": False}).get_json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        if job["progress"] and job["progress"]["layers_done"] >= 3:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert f"jobs/{job_id}/checkpoints/manifest.json" in bucket_keys(f"jobs/{job_id}/checkpoints/")
    start_worker(scratch="b")
    assert not (tmp / "scratch-b").exists() or not any((tmp / "scratch-b").iterdir())
    sweeper = Sweeper(settings, db, Dispatcher(settings))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the lease (4 s) must expire before the sweeper requeues
        if sweeper.sweep_once()["requeued"]:
            break
        time.sleep(0.5)
    job = wait(client, job_id, logs=tmp)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2 and len(job["artifacts"]) == 1
    files = lambda j: {f["path"]: f["sha256"] for f in client.get(f"/v1/artifacts/{j['artifacts'][0]['id']}/files").get_json()["items"]}
    assert files(job) == files(reference)
    events = client.get(f"/v1/jobs/{job_id}/events").get_json()["items"]
    owners = [e["data"]["owner"] for e in events if e["to_status"] == "running"]
    assert len(owners) == 2 and owners[0] != owners[1]
    replayed = [e["data"]["layers_done"] for e in events if e["kind"] == "progress" and e["data"].get("resumed")]
    assert replayed[:3] == [1, 2, 3]
