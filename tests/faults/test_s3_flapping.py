"""S3 slow and flapping while a job uploads its checkpoints and, on another worker, resumes from them.

moto_server is the real S3 endpoint; tests/support/s3server.py's proxy in front
of it answers every request half a second late, loses every third request
(read, never forwarded, the connection closed unanswered) and holds one past the
client's read timeout. It counts the writes that completed upstream per key.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from tests.support.compose import ComposeStack
from tests.support.s3server import FaultProxy, MotoServer

pytestmark = pytest.mark.slow

GPTQ = {"method": "gptq", "options": {"group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64}}
RETRY = re.compile(r"^S3 (\w+) at \S+ failed \((.+)\), attempt (\d+) of 5; (retrying|giving up)$")


def _lines(stack: ComposeStack, name: str) -> list[dict]:
    return [json.loads(x) for x in stack.log(name).read_text().splitlines() if x.startswith("{")]


def test_job_succeeds_through_slow_flapping_s3_and_uploads_nothing_twice(own_db, own_redis, deep_llama, tmp_path):
    with MotoServer() as moto, FaultProxy(moto.port) as proxy, ComposeStack(
        tmp_path, database_url=own_db, broker_url=own_redis.url, s3_url=proxy.url, QUANTFARM_LOG_FORMAT="json",
        QUANTFARM_S3_MAX_ATTEMPTS="5", QUANTFARM_S3_READ_TIMEOUT="3", QUANTFARM_S3_CONNECT_TIMEOUT="2",
        QUANTFARM_WORKER_POLL_SECONDS="1",
    ) as stack:
        stack.start("api")
        stack.start("service")
        stack.start("worker-gpu0", name="worker-a")
        stack.wait_healthy()
        stack.first_admin_key()
        job_id = stack.post("/v1/jobs", json={"model": {"source": "local", "path": str(deep_llama)}, **GPTQ}).json()["id"]
        stack.wait_job(job_id, until=("running",), timeout=120)
        before = proxy.faulted

        proxy.slow(0.5)
        proxy.flap(3)
        proxy.stall_next(1, 5.0)  # past the 3 s read timeout: a timed-out attempt, retried
        deadline = time.monotonic() + 180
        while (stack.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("layers_done", 0) < 4:
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.1)
        stack.kill("worker-a", signal.SIGTERM)  # hands the job back at its next layer boundary
        stack.start("worker-gpu0", name="worker-b")  # resumes from the checkpoints, through the same flapping link
        job = stack.wait_job(job_id, timeout=300)
        faults = proxy.faulted - before
        proxy.clear()

        assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
        assert proxy.dropped >= 3 and faults > proxy.dropped  # the link really flapped, and one attempt timed out
        events = stack.get(f"/v1/jobs/{job_id}/events").json()["items"]
        owners = [e["data"].get("owner") for e in events if e["to_status"] == "running"]
        assert len(owners) == 2 and owners[0] != owners[1]
        progress = [e["data"] for e in events if e["kind"] == "progress"]
        resumed = [p["layers_done"] for p in progress if p.get("resumed")]
        assert resumed and [p["layers_done"] for p in progress if not p.get("resumed")] == list(range(1, 11))

        # Every failed attempt was logged as retried, and none gave up.
        retries = [RETRY.match(x["message"]) for w in ("worker-a", "worker-b", "api", "service") for x in _lines(stack, w)
                   if x["message"].startswith("S3 ")]
        assert all(retries) and len(retries) == faults, (faults, [x and x.group(0) for x in retries])
        assert {m.group(4) for m in retries} == {"retrying"}
        assert any(m.group(2) == "ReadTimeoutError" for m in retries)

        # Nothing went up twice: each layer checkpoint and artifact file once, the manifest once per layer.
        names = [f"layer-{i:05d}.safetensors" for i in range(10)] + ["manifest.json"]
        checkpoints = {k: n for k, n in proxy.completed.items() if "/checkpoints/" in k}
        assert sorted(k.rsplit("/", 1)[1] for k in checkpoints) == names, proxy.completed
        assert checkpoints.pop(f"quantfarm/jobs/{job_id}/checkpoints/manifest.json") == 10, proxy.completed
        assert set(checkpoints.values()) == {1}, proxy.completed
        (art,) = job["artifacts"]
        prefix = art["location"][len("s3://"):].rstrip("/") + "/"
        files = {f["path"] for f in stack.get(f"/v1/artifacts/{art['id']}/files").json()["items"]}
        written = {k[len(prefix):]: n for k, n in proxy.completed.items() if k.startswith(prefix)}
        assert written == {f: 1 for f in files}, proxy.completed
        others = {k for k in proxy.completed if not k.startswith(prefix)} - {f"quantfarm/jobs/{job_id}/checkpoints/{k}" for k in names}
        assert others <= {"quantfarm"}, others  # nothing else but the bucket, made at start-up
