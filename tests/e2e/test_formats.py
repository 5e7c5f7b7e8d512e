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


def _awq_dequantized_logits(source, artifact_dir, ids):
    """The source with the AWQ artifact's linears dequantized by our own unpacking and its folded norms and biases set."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from workers.engine.awq_pack import dequantize_awq

    qc = json.loads((artifact_dir / "config.json").read_text())["quantization_config"]
    tensors = load_file(artifact_dir / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    params = dict(model.named_parameters())
    for name in {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}:
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}
        model.get_submodule(name).weight.data = dequantize_awq(t, qc["group_size"], qc["version"])
    for key, value in tensors.items():
        if key in params:
            params[key].data = value.float()
    with torch.no_grad():
        return model(ids).logits


def test_awq_rtn_and_fp8_jobs_write_compressed_tensors_that_load(stack, tiny_llama, tmp_path):
    """The other pairs: AWQ and RTN next to their own format, FP8 alone; each loads as a user types it."""
    from transformers import AutoModelForCausalLM

    cal = {"num_samples": 8, "seq_len": 64}
    bodies = {
        "awq": {"method": "awq", "options": {"group_size": 32, "zero_point": False}, "calibration": cal, "formats": ["compressed-tensors", "awq"]},
        "rtn": {"method": "rtn", "options": {"group_size": 32, "bits": 8}, "formats": ["gptq", "compressed-tensors"]},
        "fp8": {"method": "fp8"},
    }
    ids_ = {k: stack.submit({"model": {"source": "local", "path": str(tiny_llama)}, **b}) for k, b in bodies.items()}
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    for name, job_id in ids_.items():
        job = stack.wait(job_id)
        assert job["status"] == "succeeded", (name, job["error"])
        arts = {a["format"]: a for a in job["artifacts"]}
        assert sorted(arts) == sorted(bodies[name].get("formats", ["compressed-tensors"]))
        ct = _download(stack, arts["compressed-tensors"], tmp_path / name / "ct")
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32, device_map="cpu")(ids).logits
        if name == "awq":
            ref = _awq_dequantized_logits(tiny_llama, _download(stack, arts["awq"], tmp_path / name / "awq"), ids)
        elif name == "rtn":
            ref = engine_dequantized_logits(tiny_llama, _download(stack, arts["gptq"], tmp_path / name / "gptq"), ids)
        else:  # fp8 runs with per-token activation rounding: close to the source, not equal to it
            with torch.no_grad():
                ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
        tol = 0.2 if name == "fp8" else 1e-3
        assert float((got - ref).norm() / ref.norm()) < tol, name


def test_a_gguf_job_downloads_and_loads_in_transformers_gguf_loader(stack, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    job = stack.wait(stack.submit({"model": {"source": "local", "path": str(tiny_llama)}, "method": "gguf", "evaluate": True,
                                   "evaluation": {"max_windows": 2}, "calibration": {"seq_len": 64}}))
    assert job["status"] == "succeeded", job["error"]
    (art,) = job["artifacts"]
    assert (art["kind"], art["format"]) == ("model", "gguf")
    out = _download(stack, art, tmp_path / "gguf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.gguf"]
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)(ids).logits
        src = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
    assert float((got - src).norm() / src.norm()) < 0.05
    assert abs(job["metrics"]["perplexity_after"] / job["metrics"]["perplexity_before"] - 1) < 0.05
    page = stack.get(f"/jobs/{job['id']}").text
    assert f"./{art['id']}/model.gguf" in page and "ollama create" in page


@pytest.mark.matrix  # the Q4_K_M + imatrix search is tested in the engine; the gguf pair runs end to end above
def test_a_q4_k_m_job_with_an_importance_matrix_calibrates_and_loads(stack, tiny_llama, tmp_path):
    """Q4_K_M with imatrix through the worker: the calibration pass runs, the file decodes to the engine's model."""
    from transformers import AutoModelForCausalLM

    from quantfarm.spec import GGUFOptions
    from workers.engine.methods.gguf import write_model

    job = stack.wait(stack.submit({"model": {"source": "local", "path": str(tiny_llama)}, "method": "gguf",
                                   "options": {"quant_type": "Q4_K_M", "imatrix": True}, "calibration": {"num_samples": 4, "seq_len": 64}}))
    assert job["status"] == "succeeded", job["error"]
    assert "calibrating" in [e.get("stage") for e in stack.get(f"/v1/jobs/{job['id']}/events").json()["items"]]
    (art,) = job["artifacts"]
    out = _download(stack, art, tmp_path / "gguf")
    # hidden 128: only ffn_down's rows (256) split into super-blocks; the rest take llama-quantize's fallbacks
    assert job["metrics"]["gguf_tensor_types"] == {"F32": 5, "Q4_K": 1, "Q5_0": 12, "Q6_K": 1, "Q8_0": 2}
    from quantfarm.spec import Calibration
    from workers.engine.calibration import calibration_ids
    from workers.engine.imatrix import collect_imatrix
    from workers.engine.pipeline import load_tokenizer

    imatrix = collect_imatrix(tiny_llama, torch.device("cpu"), calibration_ids(Calibration(num_samples=4, seq_len=64), load_tokenizer(tiny_llama)))
    keep: dict = {}
    write_model(tiny_llama, tmp_path / "ref.gguf", GGUFOptions(quant_type="Q4_K_M"), name="x", imatrix=imatrix, keep=keep)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)(ids).logits
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        model.load_state_dict(keep, strict=False)
        ref = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_a_loftq_job_gives_a_bnb_base_and_a_peft_adapter(stack, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = stack.wait(stack.submit({"model": {"source": "local", "path": str(tiny_llama)}, "method": "loftq",
                                   "options": {"rank": 8, "iterations": 2}}))
    assert job["status"] == "succeeded", job["error"]
    (art,) = job["artifacts"]
    assert art["format"] == "bitsandbytes-peft"
    out = _download(stack, art, tmp_path / "loftq")
    assert {"config.json", "model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}), out, subfolder="adapter")
        assert torch.isfinite(tuned(ids).logits).all()
    assert "PeftModel.from_pretrained" in stack.get(f"/jobs/{job['id']}").text
