"""Load a quantized MoE artifact with ``GPTQModel.load`` and compare it with the engine's own model.

transformers alone cannot load per-expert quantized weights into its fused 3-D expert
tensors (it reports them MISSING and leaves the experts random), so MoE artifacts are
loaded with ``GPTQModel.load``, which keeps one kernel per expert. That loader holds
these models in fp16 (for AWQ it says "Auto fix dtype to float16" whatever it is
asked for): every tensor outside the kernels (embeddings, norms, routers, head) is
rounded to fp16, and its AWQ torch kernel also casts activations to fp16. On the
tiny test models that alone moves the logits by 1e-3 to 1.2e-2 of the largest logit
(a router whose fp16 weights pick another expert for a token), with the exported
weights exact. So the comparison is made on what the loader holds:

- every kernel's weight, dequantized by the loader, is bit for bit the engine's;
- every other loaded tensor is exactly the engine's rounded to fp16;
- the loaded model run in fp32 (each kernel's own dequantized weight, an fp32
  matmul) against the engine's dequantized model with the same fp16 rounding.
"""

from __future__ import annotations

import subprocess
import sys

import torch

_LOAD = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
m = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
kernels = {n: k for n, k in m.named_modules() if hasattr(k, "qweight")}
def weight(k):  # [out, in], as the kernel dequantizes it
    if type(k).__name__ == "AwqTorchLinear":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
        return dequantize_gemm(k.qweight, k.qzeros, k.scales, k.bits, k.group_size).t().contiguous()
    return k.dequantize_weight().t().contiguous()
weights = {n: weight(k) for n, k in kernels.items()}
out = {"kinds": sorted({type(k).__name__ for k in kernels.values()}), "weights": weights,
       "others": {n: t.clone() for n, t in m.state_dict().items() if n.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}}
ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
def fp32_forward(self, x, w):
    y = x.float() @ w.float().t()
    return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
with torch.no_grad():
    out["native"] = m(input_ids=ids).logits.float()
    m = m.float()
    for n, k in kernels.items():
        k.forward = (lambda k, w: lambda x: fp32_forward(k, x, w))(k, weights[n])
    out["fp32"] = m(input_ids=ids).logits.float()
torch.save(out, sys.argv[2])
"""


def sample_ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))


def gptqmodel_load(out_dir, dest) -> dict:
    """``GPTQModel.load`` the artifact in a child process; return its kernels' weights, other tensors and logits.

    A child, because GPTQModel swaps transformers' MoE classes process-wide on load
    (its defuser), after which transformers saves Mixtral checkpoints other tests build wrongly.
    """
    done = subprocess.run([sys.executable, "-c", _LOAD, str(out_dir), str(dest)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(dest)


def as_loaded(model, quantized: set[str]):
    """``model`` with every float parameter outside the quantized linears rounded to fp16, as GPTQModel holds them."""
    for name, p in model.named_parameters():
        if name not in quantized:
            p.data = p.data.half().float()
    return model


def assert_loads_as_the_engine(loaded: dict, engine, quantized: set[str], rel: float = 1e-3) -> None:
    """The checks in the module docstring; ``engine`` is the engine's dequantized fp32 model (changed in place)."""
    ours = engine.state_dict()
    assert {f"{n}.weight" for n in loaded["weights"]} == quantized  # every quantized linear is a kernel, no more
    for name, w in loaded["weights"].items():
        assert torch.equal(w.float(), ours[f"{name}.weight"]), name
    others = {n: t for n, t in ours.items() if n not in quantized}
    assert set(loaded["others"]) == set(others)
    for name, t in loaded["others"].items():
        assert t.dtype == torch.float16 and torch.equal(t, others[name].half()), name
    with torch.no_grad():
        want = as_loaded(engine, quantized)(input_ids=sample_ids()).logits.float()
    scale = float(want.abs().max())
    assert scale > 0.5  # the logits are not trivially small
    assert float((loaded["fp32"] - want).abs().max()) < rel * scale
