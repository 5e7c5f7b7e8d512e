"""AWQ on mixture-of-experts models, loaded back through transformers + GPTQModel.

How the loaded model is compared with the engine's (and why not on raw fp16 logits)
is in ``moe_load``: every kernel's weight bit for bit, every other tensor as the
loader's fp16, the loaded model in fp32 within 1e-3 of the engine's own. GPTQModel's
own fp16 path is also checked, loosely (what a user gets).
"""

from __future__ import annotations

import pytest
import torch

from tests.workers.engine.moe_load import assert_loads_as_the_engine, gptqmodel_load, sample_ids
from tests.workers.engine_methods.helpers import CPU, awq_request, checkpoint_layers, perturb
from workers.engine.arch import arch_for
from workers.engine.methods import method_for
from workers.engine.moe import unfuse_loaded

GROUP = 64


def engine_model(source, ckpt_dir, options):
    """The float source with unfused experts and each layer set by AWQ's ``apply`` from its checkpoint;
    and the names of the quantized linears' weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu").eval()
    arch = arch_for(model.config)
    unfuse_loaded(model, arch)
    m = method_for("awq", options)
    layers = model.get_submodule(arch.layers)
    quantized = set()
    for i, tensors in enumerate(checkpoint_layers(ckpt_dir)):
        m.apply(arch.at(i), layers[i], tensors)
        quantized |= {f"{arch.layers}.{i}.{n}.weight" for n in arch.at(i).linears}
    return model, quantized


@pytest.fixture(scope="module")
def awq_moe(tmp_path_factory, tokenizer_dir):
    """Quantize a tiny MoE model (random biases and norm weights, ``perturb``) with AWQ once per case."""
    from storage.artifacts import LocalStore
    from tests.support.models import make_tiny_model
    from workers.engine.run import quantize

    runs = {}

    def get(arch: str, **config):
        key = (arch, *sorted(config.items()))
        if key not in runs:
            d = tmp_path_factory.mktemp(f"awq-{arch}")
            src = perturb(make_tiny_model(d / "src", arch, tokenizer_dir=tokenizer_dir, **config))
            req = awq_request(src, group_size=GROUP)
            res = quantize(req, LocalStore(d / "ckpt"), d / "out", device=CPU)
            runs[key] = (src, d, req, res)
        return runs[key]

    return get


CASES = [
    pytest.param("qwen2_moe", {}, id="qwen2_moe"),  # routed + gated shared experts: one case in make test
    pytest.param("mixtral", {}, id="mixtral", marks=pytest.mark.matrix),
    pytest.param("qwen3_moe", {}, id="qwen3_moe", marks=pytest.mark.matrix),
    # DeepSeek-V2-Lite's shape: latent attention, a dense first layer, then shared + routed experts
    pytest.param("deepseek_v2", {"layers": 3, "first_k_dense_replace": 1}, id="deepseek_v2_lite", marks=pytest.mark.matrix),
    # the full DeepSeek-V2's low-rank queries: q_a_layernorm's scales fold into q_b_proj
    pytest.param("deepseek_v2", {"q_lora_rank": 128}, id="deepseek_v2_q_lora", marks=pytest.mark.matrix),
]


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_awq_moe_loads_in_gptqmodel_exactly_as_the_engine_dequantizes(awq_moe, tmp_path, arch, config):
    source, work, req, res = awq_moe(arch, **config)
    assert res.quantization_config["quant_method"] == "awq"
    loaded = gptqmodel_load(work / "out", tmp_path / "loaded.pt")
    assert loaded["kinds"] == ["AwqTorchLinear"]
    engine, quantized = engine_model(source, work / "ckpt", req.options)
    assert any(".experts.3.down_proj." in n for n in quantized)
    with torch.no_grad():
        exact = engine(input_ids=sample_ids()).logits.float()
    # GPTQModel's own path (fp16 tensors and activations): close, not exact.
    assert float((loaded["native"] - exact).abs().max()) < 3e-2 * float(exact.abs().max())
    assert_loads_as_the_engine(loaded, engine, quantized)


@pytest.mark.matrix
def test_awq_deepseek_lite_resumes_byte_identical_after_a_crash(awq_moe, tmp_path):
    """A crash after the dense first layer: it is replayed from its checkpoint, the sparse layers computed."""
    from storage.artifacts import LocalStore
    from tests.workers.engine_methods.helpers import sha256_tree
    from workers.engine.run import quantize

    class Crash(RuntimeError):
        pass

    source, whole, req, _ = awq_moe("deepseek_v2", layers=3, first_k_dense_replace=1)

    def crash_after_first(report):
        if report.index == 0:
            raise Crash

    store = LocalStore(tmp_path / "ckpt")
    with pytest.raises(Crash):
        quantize(req, store, tmp_path / "out-1", device=CPU, on_layer=crash_after_first)
    res = quantize(req, store, tmp_path / "out-2", device=CPU)
    assert res.layers_replayed == [0] and res.layers_computed == [1, 2]
    assert sha256_tree(tmp_path / "out-2") == sha256_tree(whole / "out")
    assert "mlp.gate_proj.qweight" in checkpoint_layers(tmp_path / "ckpt")[0]  # the dense layer, AWQ-quantized
    assert "mlp.experts.3.down_proj.qweight" in checkpoint_layers(tmp_path / "ckpt")[1]
