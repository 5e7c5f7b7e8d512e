"""The scratch disk fills up mid-job: a clear ``scratch_full`` error, a retry finishes on another worker.

Worker A's scratch directory is a 512 KiB tmpfs (really full: the kernel answers
ENOSPC); worker B's is a normal directory. The checkpoints live in the store, so
the retry resumes from them, and its files must be byte-identical to an
undisturbed run's: no half-written checkpoint is ever replayed.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.compose import ComposeStack

pytestmark = pytest.mark.slow

GPTQ = {"method": "gptq", "options": {"group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64}}


@pytest.fixture
def tiny_disk(tmp_path):
    path = tmp_path / "tiny-scratch"
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); needs root")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _files(stack: ComposeStack, job: dict) -> dict[str, str]:
    (art,) = job["artifacts"]
    return {f["path"]: f["sha256"] for f in stack.get(f"/v1/artifacts/{art['id']}/files").json()["items"]}


def test_full_scratch_fails_clearly_and_a_retry_resumes_elsewhere(own_db, own_redis, deep_llama, tiny_disk, tmp_path):
    with ComposeStack(tmp_path, database_url=own_db, broker_url=own_redis.url, s3_url="http://127.0.0.1:9",
                      QUANTFARM_STORE="local", QUANTFARM_ARTIFACT_DIR=str(tmp_path / "store")) as stack:
        stack.start("api")
        stack.start("worker-gpu0", name="worker-a", QUANTFARM_SCRATCH_DIR=str(tiny_disk))
        stack.wait_healthy()
        stack.first_admin_key()
        body = {"model": {"source": "local", "path": str(deep_llama)}, **GPTQ}
        job_id = stack.post("/v1/jobs", json=body).json()["id"]
        failed = stack.wait_job(job_id)
        assert failed["status"] == "failed", f"{failed}\n{stack.logs()}"
        assert failed["error"] == {"code": "scratch_full", "message": (
            "The worker's scratch disk is full; retry the job: it resumes from its checkpoints on any worker.")}
        assert [p for p in tiny_disk.rglob("*") if p.is_file()] == []  # the failed attempt cleaned its scratch up

        stack.kill("worker-a")
        stack.start("worker-gpu0", name="worker-b")
        assert stack.post(f"/v1/jobs/{job_id}/retry").status_code == 202
        retried = stack.wait_job(job_id)
        assert retried["status"] == "succeeded" and retried["attempt"] == 2, f"{retried}\n{stack.logs()}"
        reference = stack.wait_job(stack.post("/v1/jobs", json={**body, "reuse": False}).json()["id"])  # undisturbed, same worker
        assert reference["status"] == "succeeded"
        assert _files(stack, retried) == _files(stack, reference)
        events = stack.get(f"/v1/jobs/{job_id}/events").json()["items"]
        owners = [e["data"].get("owner") for e in events if e["to_status"] == "running"]
        assert len(owners) == 2 and owners[0] != owners[1]
