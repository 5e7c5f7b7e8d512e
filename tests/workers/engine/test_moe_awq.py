"""AWQ on mixture-of-experts models, loaded back through transformers + GPTQModel.

transformers' own AWQ loader cannot put per-expert weights into its fused 3-D expert
tensors (it reports them MISSING and leaves the experts random), so the artifact is
loaded with ``GPTQModel.load``, which keeps one AWQ kernel per expert. That loader
holds AWQ models in fp16 whatever dtype it is asked for (it logs "Auto fix dtype to
float16"): every tensor outside the kernels (embeddings, norms, routers, head) is
rounded to fp16, and its torch kernel casts activations to fp16 before each matmul.
Together these put its logits ~1e-3 to 7e-3 (relative to the largest logit) from the
engine's fp32 model on these tiny models; the export itself is exact. So the tests
assert, on what the loader holds:

- every quantized linear (each expert's included) dequantizes in the loaded model to
  exactly the engine's weight, bit for bit;
- every other loaded tensor is exactly the engine's, rounded to fp16;
- the loaded model run in fp32 (its kernels' own dequantized weights in an fp32
  matmul) is within 1e-3 relative of the engine's dequantized model with its float
  tensors rounded to fp16 as the loader holds them;
- and GPTQModel's own fp16 path stays within 3e-2 (what a user gets).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.workers.engine_methods.helpers import CPU, awq_request, checkpoint_layers, perturb
from workers.engine.arch import arch_for
from workers.engine.methods import method_for
from workers.engine.moe import unfuse_loaded

GROUP = 64
_PACKED = ("qweight", "qzeros", "scales")

_LOAD = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
m = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
kernels = {n: k for n, k in m.named_modules() if hasattr(k, "qweight")}
def weight(k):  # what the kernel multiplies by: fp16(scale * (q - zero)), [out, in]
    return dequantize_gemm(k.qweight, k.qzeros, k.scales.half(), k.bits, k.group_size).t().contiguous()
out = {"kinds": sorted({type(k).__name__ for k in kernels.values()}),
       "weights": {n: weight(k) for n, k in kernels.items()},
       "others": {n: t.clone() for n, t in m.state_dict().items() if n.rpartition(".")[2] not in ("qweight", "qzeros", "scales")}}
ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
def fp32_forward(self, x):
    y = x.float() @ weight(self).float().t()
    return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
with torch.no_grad():
    out["native"] = m(input_ids=ids).logits.float()
    m = m.float()
    for k in kernels.values():
        k.forward = fp32_forward.__get__(k)
    out["fp32"] = m(input_ids=ids).logits.float()
torch.save(out, sys.argv[2])
"""


def gptqmodel_load(out_dir, dest) -> dict:
    """Load the artifact with ``GPTQModel.load`` in a child process (its MoE defuser patches
    transformers process-wide); return its kernels' weights, its other tensors and logits."""
    done = subprocess.run([sys.executable, "-c", _LOAD, str(out_dir), str(dest)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(dest)


def engine_model(source, ckpt_dir, options, *, fp16_tensors: bool = False):
    """The float source with unfused experts and each layer set by AWQ's ``apply`` from its checkpoint.

    ``fp16_tensors``: every float tensor outside the quantized linears rounded to fp16, as GPTQModel holds them.
    """
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
    if fp16_tensors:
        for name, p in model.named_parameters():
            if name not in quantized:
                p.data = p.data.half().float()
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
]


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_awq_moe_loads_in_gptqmodel_exactly_as_the_engine_dequantizes(awq_moe, tmp_path, arch, config):
    source, work, req, res = awq_moe(arch, **config)
    assert res.quantization_config["quant_method"] == "awq"
    loaded = gptqmodel_load(work / "out", tmp_path / "loaded.pt")
    assert loaded["kinds"] == ["AwqTorchLinear"]

    want, quantized = engine_model(source, work / "ckpt", req.options)
    ours = want.state_dict()
    # Every quantized linear, each expert's included, is a kernel in the loaded model and computes our weight exactly.
    assert {f"{n}.weight" for n in loaded["weights"]} == quantized
    assert any(".experts.3.down_proj." in n for n in quantized)
    for name, w in loaded["weights"].items():
        assert torch.equal(w.float(), ours[f"{name}.weight"]), name
    # Every other tensor is ours in fp16 (the loader's dtype), folded norms included; none is missing.
    others = {n: t for n, t in ours.items() if n not in quantized}
    assert set(loaded["others"]) == set(others)
    for name, t in loaded["others"].items():
        assert t.dtype == torch.float16, name
        assert torch.equal(t, others[name].half()), name

    ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = want(input_ids=ids).logits.float()
        as_held = engine_model(source, work / "ckpt", req.options, fp16_tensors=True)[0](input_ids=ids).logits.float()
    scale = float(exact.abs().max())
    assert scale > 0.5  # the logits are not trivially small
    assert float((loaded["fp32"] - as_held).abs().max()) < 1e-3 * scale
    assert float((loaded["native"] - exact).abs().max()) < 3e-2 * scale
