"""FP8 W8A8 in compressed-tensors: e4m3 weights per channel, dynamic per-token activations, no calibration.

Loaded through transformers + compressed-tensors on CPU: decompressed, it is the
engine's model exactly; run compressed, compressed-tensors also quantizes the
activations per token, as vLLM does.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from quantfarm import spec
from quantfarm.errors import ValidationFailed
from storage.artifacts import LocalStore
from tests.workers.engine.helpers import file_hashes
from tests.workers.engine_methods.helpers import CALIB, CPU, sample_ids
from tests.workers.engine_methods.test_compressed import engine_model
from workers.engine.methods.fp8 import FP8_MAX, fp8_dequantize, fp8_quantize
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize


def _req(source):
    return QuantizeRequest(source_dir=source, method="fp8", options=spec.FP8Options(), calibration=CALIB, base_model="tiny")


@pytest.fixture(scope="module")
def fp8_run(tiny_source, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    source = tiny_source("llama")
    return source, d, quantize(_req(source), LocalStore(d / "ckpt"), d / "out", device=CPU)


def test_rows_scale_to_the_e4m3_range_and_round_to_nearest():
    W = torch.tensor([[1.0, -0.5, 0.25, 0.001], [-3.0, 2.0, 0.0, 1.5]])
    q, scale = fp8_quantize(W, torch.float32)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 1)
    assert torch.equal(scale.flatten(), torch.tensor([1.0, 3.0]) / FP8_MAX)
    assert q.float().abs().amax(dim=1).tolist() == [FP8_MAX, FP8_MAX]  # each row's absmax lands on 448
    err = (fp8_dequantize(q, scale) - W).abs()
    assert bool((err <= W.abs() / 16 + 1e-6).all())  # 3 mantissa bits: at most half a step of 1/8


def test_fp8_artifact_decompresses_in_transformers_to_the_engines_model(fp8_run):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    source, d, res = fp8_run
    assert [o.format for o in res.outputs] == ["compressed-tensors"] and res.layers_computed == [0, 1]
    qc = json.loads((d / "out" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and qc["ignore"] == ["lm_head"]
    assert (group["weights"]["type"], group["weights"]["strategy"], group["weights"]["dynamic"]) == ("float", "channel", False)
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("token", True)
    with safe_open(d / "out" / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert w.dtype == torch.float8_e4m3fn and s.shape == (w.shape[0], 1)

    ids = sample_ids(1000)
    with torch.no_grad():
        ref = engine_model(source, d / "ckpt", "fp8", {})(ids).logits
        dec = AutoModelForCausalLM.from_pretrained(d / "out", dtype=torch.float32, device_map="cpu",
                                                   quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
        assert float((dec(ids).logits - ref).norm() / ref.norm()) < 1e-6
        run = AutoModelForCausalLM.from_pretrained(d / "out", dtype=torch.float32, device_map="cpu").eval()
        got = run(ids).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.2  # the per-token activation rounding the weights-only model does not do


def test_fp8_resumes_byte_identical(fp8_run, tmp_path):
    source, d, _ = fp8_run

    class Crash(RuntimeError):
        pass

    def crash(report):
        raise Crash()

    with pytest.raises(Crash):
        quantize(_req(source), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU, on_layer=crash)
    res = quantize(_req(source), LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU)
    assert res.layers_replayed == [0] and res.layers_computed == [1]
    assert file_hashes(tmp_path / "out") == file_hashes(d / "out")


def test_fp8_writes_only_compressed_tensors():
    assert spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "fp8"}).formats == ["compressed-tensors"]
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "fp8", "formats": ["gptq"]})
    assert err.value.details["fields"] == {"formats.0": "fp8 cannot write 'gptq'; it writes: compressed-tensors"}
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "fp8", "options": {"bits": 8}})
    assert err.value.details["fields"] == {"options.bits": "unknown field"}
