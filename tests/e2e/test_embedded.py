"""End to end, as a user would: `quantfarm run` in a subprocess, jobs over HTTP.

The stack runs with SQLite, the local store and kombu's filesystem broker, as
`make run` does; a real Celery worker process does the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import pytest
import torch

from tests.support.models import add_bert
from tests.support.stack import EmbeddedStack

pytestmark = pytest.mark.slow
CAL = {"num_samples": 8, "seq_len": 64}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = EmbeddedStack(tmp_path_factory.mktemp("stack") / "home").start()
    yield s
    children = {name: s.pid(name) for name in ("api", "worker", "service")}
    code = s.stop()  # one SIGTERM to `quantfarm run`
    assert code == 0, s.log.read_text()[-3000:]
    for name, pid in children.items():
        assert s.pid(name) is None  # the supervisor removed its pid files after stopping them
        assert pid is None or not _alive(pid), f"{name} (pid {pid}) outlived the supervisor"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def file_hashes(job: dict, stack: EmbeddedStack) -> dict[str, str]:
    (art,) = job["artifacts"]
    files = stack.get(f"/v1/artifacts/{art['id']}/files").json()
    items = files["items"] if isinstance(files, dict) else files
    return {f["path"]: f["sha256"] for f in items}


def engine_dequantized_logits(source, artifact_dir, ids):
    """The source model with every quantized linear replaced by our own dequantization of the artifact."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from workers.engine.pack import dequantize_gptq

    tensors = {}
    for f in artifact_dir.glob("*.safetensors"):
        tensors.update(load_file(f))
    bits = json.loads((artifact_dir / "config.json").read_text())["quantization_config"]["bits"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    names = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}
    assert names, "the artifact holds no quantized linears"
    for name in names:
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        model.get_submodule(name).weight.data = dequantize_gptq(t, bits)
    with torch.no_grad():
        return model(ids).logits


def test_rtn_job_end_to_end_loads_in_transformers(stack, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    job_id = stack.submit({"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    job = stack.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1 and job["progress"]["layers_done"] == job["progress"]["layers_total"] == 2
    out = stack.download_artifact(job, tmp_path / "artifact")
    for f in out.iterdir():  # what we downloaded is what the artifact row recorded
        assert hashlib.sha256(f.read_bytes()).hexdigest() == file_hashes(job, stack)[f.name]
    assert {"config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu", quantization_config=GPTQConfig(bits=4, backend="gptq_torch"))
    with torch.no_grad():
        got = model(ids).logits
    ref = engine_dequantized_logits(tiny_llama, out, ids)
    assert (got - ref).abs().max().item() < 1e-3
    # And as a user types it, with no quantization_config: transformers reads ours from
    # config.json and gptqmodel picks its default CPU kernel (compiled, low-precision scales).
    plain = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert plain.config.quantization_config.bits == 4
    with torch.no_grad():
        user = plain(ids).logits.float()
    assert (user - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (user.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.95


def test_kill_9_of_the_worker_resumes_to_identical_bytes(stack, deep_llama):
    body = {"model": {"source": "local", "path": str(deep_llama)}, "method": "gptq", "options": {"group_size": 32}, "calibration": CAL}
    reference = stack.wait(stack.submit(body))
    assert reference["status"] == "succeeded", reference["error"]

    job_id = stack.submit({**body, "reuse": False})  # computed again, not reused
    seen: list[tuple[int, float | None]] = []

    def record(job):
        if job["progress"]:
            seen.append((job["progress"]["layers_done"], job["progress"]["eta_seconds"]))

    stack.wait(job_id, until=("running",), on_poll=record)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a couple of layers are checkpointed
        job = stack.get(f"/v1/jobs/{job_id}").json()
        record(job)
        if job["progress"] and 2 <= job["progress"]["layers_done"] < job["progress"]["layers_total"] - 2:
            break
        time.sleep(0.05)
    killed_at = job["progress"]["layers_done"]
    old_pid = stack.pid("worker")
    os.kill(old_pid, signal.SIGKILL)

    job = stack.wait(job_id, on_poll=record)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    assert len(job["artifacts"]) == 1
    assert stack.pid("worker") != old_pid  # the supervisor restarted the worker
    assert file_hashes(job, stack) == file_hashes(reference, stack)  # byte-identical to the uninterrupted run
    events = stack.get(f"/v1/jobs/{job_id}/events").json()
    events = events["items"] if isinstance(events, dict) else events
    assert any(e["to_status"] == "queued" and e["from_status"] == "running" for e in events)
    resumed = [e["data"]["resumed"] for e in events if e["kind"] == "progress"]
    assert resumed.count(True) >= killed_at - 1 >= 1  # finished layers were replayed, not recomputed
    dones = [d for d, _ in seen]
    assert max(dones) == 10 and any(0 < d < 10 for d in dones)  # progress moved during the job
    assert any(eta is not None and eta > 0 for d, eta in seen if d < 10)


def test_sigterm_to_the_worker_requeues_its_job_without_spending_an_attempt(stack, deep_llama):
    """A spot GPU going away: the worker hands its job back at the next layer; another run resumes it."""
    body = {"model": {"source": "local", "path": str(deep_llama)}, "method": "gptq", "options": {"group_size": 32}, "calibration": CAL}
    reference = stack.wait(stack.submit(body))
    assert reference["status"] == "succeeded", reference["error"]
    job_id = stack.submit({**body, "reuse": False})  # computed again, not reused
    stack.wait(job_id, until=("running",))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = stack.get(f"/v1/jobs/{job_id}").json()
        if job["progress"] and 2 <= job["progress"]["layers_done"] < job["progress"]["layers_total"] - 2:
            break
        time.sleep(0.05)
    old_pid = stack.pid("worker")
    os.kill(old_pid, signal.SIGTERM)
    job = stack.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1  # preemption spends no attempt
    assert stack.pid("worker") != old_pid  # it stopped; the supervisor started a new one
    events = stack.get(f"/v1/jobs/{job_id}/events").json()
    events = events["items"] if isinstance(events, dict) else events
    handed_back = [e for e in events if e["from_status"] == "running" and e["to_status"] == "queued"]
    assert len(handed_back) == 1 and handed_back[0]["data"].get("preempted") is True
    assert file_hashes(job, stack) == file_hashes(reference, stack)  # byte-identical to the undisturbed run


@pytest.mark.parametrize(
    "body,code,field",
    [
        ("{not json", "invalid_json", None),
        ({"model": {"source": "local", "path": "/x"}, "method": "zip"}, "validation_error", "method"),
        ({"model": {"source": "local", "path": "/x"}, "method": "gptq", "options": {"bits": 5}}, "validation_error", "options.bits"),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_stored(stack, body, code, field):
    before = stack.get("/v1/jobs?limit=200").json()["items"]
    if isinstance(body, str):
        r = stack.post("/v1/jobs", data=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
    else:
        r = stack.post("/v1/jobs", json=body)
        assert r.status_code == 422
        assert field in r.json()["details"]["fields"]
    assert r.json()["error"] == code and r.json()["message"]
    assert stack.get("/v1/jobs?limit=200").json()["items"] == before


def test_bad_models_fail_with_a_clear_error_and_the_worker_survives(stack, tmp_path, tiny_llama):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("not a model")
    cases = {
        "model_not_found": str(tmp_path / "missing"),
        "not_a_model": str(empty),
        "unsupported_architecture": str(add_bert(tmp_path / "bert")),
    }
    worker = stack.pid("worker")
    for code, path in cases.items():
        job_id = stack.submit({"model": {"source": "local", "path": path}, "method": "gptq", "calibration": CAL})
        job = stack.wait(job_id)
        assert job["status"] == "failed" and job["error"]["code"] == code, job
        assert job["error"]["message"]
    assert stack.pid("worker") == worker  # no crash, no restart
    ok = stack.wait(stack.submit({"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"}))
    assert ok["status"] == "succeeded"


@pytest.mark.parametrize(
    "method,options,fmt",
    [("awq", {"group_size": 64}, "awq"), ("bnb-4bit", {"quant_type": "nf4"}, "bitsandbytes"), ("bnb-8bit", {}, "bitsandbytes")],
)
def test_each_method_runs_through_the_api(stack, tiny_llama, tmp_path, method, options, fmt):
    from transformers import AutoModelForCausalLM

    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": method, "options": options,
            "calibration": CAL, "evaluate": True, "evaluation": {"max_windows": 2}}
    job = stack.wait(stack.submit(body))
    assert job["status"] == "succeeded", job["error"]
    (art,) = job["artifacts"]
    assert art["format"] == fmt
    m = job["metrics"]
    assert m["perplexity_before"] > 0 and m["perplexity_after"] > 0 and m["size_bytes_after"] < m["size_bytes_before"]
    out = stack.download_artifact(job, tmp_path / method)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt
    if fmt == "bitsandbytes":  # reloads with no quantization_config argument
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        # get_memory_footprint before (the source) and after (the quantized model), through the API
        assert 0 < m["memory_footprint_after"] < m["memory_footprint_before"]
        assert m["memory_footprint_after"] == model.get_memory_footprint()
        with torch.no_grad():
            assert torch.isfinite(model(torch.arange(16).view(1, 16)).logits).all()


def test_uploaded_calibration_file_is_used(stack, tiny_llama):
    from workers.engine.calibration import builtin_code_texts

    text = "\n".join(builtin_code_texts(holdout=True, max_chars=60_000))
    up = stack.post("/v1/uploads", files={"file": ("calib.txt", text.encode(), "text/plain")})
    assert up.status_code == 201, up.text
    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": "gptq",
            "calibration": {"upload_id": up.json()["id"], "num_samples": 4, "seq_len": 64}}
    job = stack.wait(stack.submit(body))
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["calibration"]["upload_id"] == up.json()["id"]
    # a different calibration set gives different weights than builtin:code
    other = stack.wait(stack.submit({**body, "calibration": {"num_samples": 4, "seq_len": 64}}))
    assert file_hashes(job, stack)["model.safetensors"] != file_hashes(other, stack)["model.safetensors"]
