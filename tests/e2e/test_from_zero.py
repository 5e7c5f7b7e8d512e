"""Production from zero: the compose-shaped processes on a fresh database and an empty S3 server.

``migrate``, the gunicorn API, the service worker and a job worker are started
with the commands and environment in ``docker-compose.yml`` (tests/support/compose.py),
against a new PostgreSQL database with no tables, a Redis of the test's own and a
``moto_server`` with no bucket. Nothing is prepared by a fixture: the first job must
run to the end on what the processes do at start-up.
"""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
import requests

from tests.api.test_service import _parse_metrics
from tests.conftest import PG_ADMIN, _admin_exec
from tests.support.compose import ComposeStack
from tests.support.s3server import MotoServer
from tests.support.servers import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_database():
    name = f"qf_zero_{uuid.uuid4().hex[:10]}"
    _admin_exec(f"CREATE DATABASE {name}")
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    _admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_first_job_on_a_fresh_stack_succeeds(fresh_database, tiny_llama, tmp_path):
    with MotoServer() as moto, RedisServer() as redis_server, ComposeStack(
        tmp_path, database_url=fresh_database, broker_url=redis_server.url, s3_url=moto.url,
    ) as stack:
        s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                          aws_access_key_id="quantfarm", aws_secret_access_key="quantfarm-secret")
        assert s3.list_buckets()["Buckets"] == []  # an empty S3 server

        migrated = stack.run_once("migrate")
        assert migrated.returncode == 0, stack.logs()
        assert "is at the latest schema" in stack.log("migrate").read_text()
        stack.start("api")
        stack.start("service")
        stack.start("worker-gpu0", name="worker")
        stack.wait_healthy()
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["quantfarm"]  # made at start-up
        assert stack.get("/healthz").json() == {"status": "ok", "db": "ok", "broker": "ok"}

        stack.first_admin_key()  # as the compose file's header says: `quantfarm keys create --local ...`
        assert stack.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = stack.post("/v1/jobs", json={"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
        assert r.status_code == 201, r.text
        job = stack.wait_job(r.json()["id"])
        assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
        assert job["attempt"] == 1
        (artifact,) = job["artifacts"]
        files = stack.get(f"/v1/artifacts/{artifact['id']}/files").json()["items"]
        assert artifact["location"].startswith(f"s3://quantfarm/jobs/{job['id']}/")
        prefix = artifact["location"][len("s3://quantfarm/"):].rstrip("/") + "/"
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="quantfarm", Prefix=prefix).get("Contents", [])}
        assert keys == {prefix + f["path"] for f in files}
        paths = {f["path"] for f in files}
        assert "config.json" in paths and any(p.endswith(".safetensors") for p in paths), paths
        ended = ("quantfarm_worker_job_seconds_count", (("method", "rtn"), ("status", "succeeded")))
        deadline = time.monotonic() + 30
        while True:  # the worker observes the attempt's run time once its last clean-up is done
            worker = _parse_metrics(requests.get(f"http://127.0.0.1:{stack.metrics_ports['worker']}/metrics", timeout=10).text)
            if ended in worker or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        layers = job["progress"]["layers_total"]
        assert worker[("quantfarm_layer_seconds_count", (("method", "rtn"),))] == layers
        assert worker[ended] == 1
        assert worker[("quantfarm_workers", (("capacity", "1"), ("device", "cpu"), ("role", "worker")))] == 1
        assert worker[("quantfarm_checkpoint_bytes_total", ())] > 0
        service = _parse_metrics(requests.get(f"http://127.0.0.1:{stack.metrics_ports['service']}/metrics", timeout=10).text)
        assert service[("quantfarm_workers", (("capacity", "0"), ("device", "cpu"), ("role", "service")))] == 1
        for name, proc in stack.procs.items():
            assert proc.poll() is None, f"{name} exited:\n{stack.logs()}"
