"""Shared pieces of the AWQ / bitsandbytes tests: sources, requests, loaders, digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantfarm.spec import AWQOptions, Calibration, Evaluation
from quantfarm.store import walk_files
from workers.engine.pipeline import QuantizeRequest

CPU = torch.device("cpu")
# Small on purpose: 4 windows of 64 tokens keep a layer's AWQ search under a second here.
CALIB = Calibration(num_samples=4, seq_len=64)


def perturb(model_dir: Path, seed: int = 1) -> Path:
    """Give every bias and norm weight random non-trivial values, in place.

    Random-init biases are zero and norm weights one; folding AWQ scales into
    them, or rounding a bias to fp16, would then change nothing a test can see.
    Every 32nd norm channel is made 4x larger: the activation outliers real models
    have, where AWQ's scales lower the held-out error and are therefore kept.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for f in files:
        sd = load_file(f)
        for name, t in sd.items():
            if t.dim() == 1 and name.endswith(".bias"):
                sd[name] = (torch.randn(t.shape, generator=gen) * 0.1).to(t.dtype)
            elif t.dim() == 1 and "norm" in name and name.endswith(".weight"):
                w = 1 + torch.rand(t.shape, generator=gen) * 0.5
                w[::32] *= 4
                sd[name] = w.to(t.dtype)
        save_file(sd, f, metadata={"format": "pt"})
    return model_dir


def awq_request(source: Path, *, evaluate: bool = False, calibration: Calibration = CALIB, **options) -> QuantizeRequest:
    return QuantizeRequest(
        source_dir=source, method="awq", options=AWQOptions(**options), calibration=calibration,
        evaluate=evaluate, evaluation=Evaluation(max_windows=4), base_model="tiny",
    )


def bnb_request(source: Path, method: str, *, evaluate: bool = False, **options) -> QuantizeRequest:
    from quantfarm.spec import METHOD_OPTIONS

    return QuantizeRequest(
        source_dir=source, method=method, options=METHOD_OPTIONS[method](**options), calibration=CALIB,
        evaluate=evaluate, evaluation=Evaluation(max_windows=4), base_model="tiny",
    )


def checkpoint_layers(ckpt_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Every layer checkpoint in a LocalStore directory, in layer order."""
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    layers = manifest["layers"]
    return [load_file(ckpt_dir / layers[str(i)]["key"]) for i in range(len(layers))]


def fake_quant_model(source: Path, ckpt_dir: Path, method):
    """The engine's own quantized model: the float source with ``method.apply`` on every layer."""
    from transformers import AutoModelForCausalLM

    from workers.engine.arch import arch_for

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    arch = arch_for(model.config)
    layers = model.get_submodule(arch.layers)
    for i, tensors in enumerate(checkpoint_layers(ckpt_dir)):
        method.apply(arch.at(i), layers[i], tensors)
    return model


def load_awq(out_dir: Path, *, dense: bool = True):
    """Load an AWQ artifact with transformers (gptqmodel kernels) in float32 on CPU.

    gptqmodel's CPU AWQ kernel (TorchAtenAwqLinear) has two paths: a fused int4
    matmul that casts activations to bf16 (~3e-2 off in logits), and the dense
    path it uses when training: ``fp16(scale * (q - zero))`` cast to the input
    dtype and an fp32 matmul. ``dense`` pins the second, which computes what the
    checkpoint says at fp32 precision.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    if dense:
        for m in model.modules():
            if type(m).__name__ == "TorchAtenAwqLinear":
                m.linear_mode = "train"
    return model


def sha256_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in walk_files(root)}


def sample_ids(vocab: int, seed: int = 0, shape=(2, 48)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))
