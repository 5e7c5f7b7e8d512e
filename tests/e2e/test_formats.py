"""End to end over HTTP: one GPTQ job writes gptq and compressed-tensors; each loads in its real client.

The stack is `quantfarm run` in a subprocess (SQLite, local store, filesystem broker, a
real Celery worker), as in test_embedded.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_embedded import engine_dequantized_logits
from tests.support.stack import EmbeddedStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = EmbeddedStack(tmp_path_factory.mktemp("stack") / "home").start()
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def _download(stack, art: dict, dest):
    for f in stack.get(f"/v1/artifacts/{art['id']}/files").json()["items"]:
        r = stack.get(f"/v1/artifacts/{art['id']}/files/{f['path']}")
        assert r.status_code == 200, r.text
        (dest / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        (dest / f["path"]).write_bytes(r.content)
    return dest


def test_gptq_job_writes_both_formats_and_each_loads(stack, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": "gptq", "options": {"group_size": 32},
            "calibration": {"num_samples": 8, "seq_len": 64}, "formats": ["gptq", "compressed-tensors"]}
    job = stack.wait(stack.submit(body))
    assert job["status"] == "succeeded", job["error"]
    arts = {a["format"]: a for a in job["artifacts"]}
    assert {(a["kind"], a["format"]) for a in arts.values()} == {("model", "gptq"), ("compressed-tensors", "compressed-tensors")}
    gptq = _download(stack, arts["gptq"], tmp_path / "gptq")
    ct = _download(stack, arts["compressed-tensors"], tmp_path / "ct")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = engine_dequantized_logits(tiny_llama, gptq, ids)
    model = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32, device_map="cpu")  # as a vLLM/transformers user types it
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-3
    page = stack.get(f"/jobs/{job['id']}").text
    assert 'vllm serve' in page and arts["compressed-tensors"]["id"] in page


def test_an_invalid_pair_is_a_422_naming_the_valid_formats(stack):
    r = stack.post("/v1/jobs", json={"model": {"source": "local", "path": "/m"}, "method": "awq", "formats": ["gptq"]})
    assert r.status_code == 422
    assert r.json()["details"]["fields"] == {"formats.0": "awq cannot write 'gptq'; it writes: awq, compressed-tensors"}
