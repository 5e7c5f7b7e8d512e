"""AWQ end to end: the exported checkpoint loads in transformers and computes what the engine computed.

Tiny random models are built locally (the Hub is unreachable here), with random
biases and norm weights so that scale folding and bias handling show in the
numbers. Loading goes through transformers + gptqmodel on CPU; see
``helpers.load_awq`` for the kernel path pinned for an fp32 comparison.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.workers.engine_methods.helpers import (
    checkpoint_layers,
    fake_quant_model,
    load_awq,
    sample_ids,
)
from workers.engine.arch import ARCHITECTURES
from workers.engine.awq_pack import unpack_gemm
from workers.engine.methods import method_for

# One architecture of each family runs in `make test`; the rest is the matrix.
ARCHS = ["llama", "opt", "gemma2", "phi3",
         *(pytest.param(a, marks=pytest.mark.matrix) for a in ("mistral", "qwen2", "qwen3", "gemma3_text"))]


def _max_logit_diff(run, seed: int = 0) -> tuple[float, float]:
    ours = fake_quant_model(run.source, run.ckpt, method_for("awq", run.req.options))
    loaded = load_awq(run.out)
    ids = sample_ids(loaded.config.vocab_size, seed=seed)
    with torch.no_grad():
        want, got = ours(ids).logits, loaded(ids).logits
    return (want - got).abs().max().item(), want.abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_artifact_matches_engine_fake_quant(arch, awq_run):
    run = awq_run(arch, group_size=64)
    qcfg = json.loads((run.out / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    assert run.result.quantization_config == qcfg
    assert run.result.layers_computed == [0, 1] and run.result.layers_replayed == []
    assert {"README.md", "tokenizer.json", "model.safetensors"} <= {p.name for p in run.out.iterdir()}

    loaded = load_awq(run.out)
    spec = ARCHITECTURES[arch]
    for layer in loaded.get_submodule(spec.layers):  # every linear runs through an AWQ kernel ...
        for name in spec.linears:
            assert type(layer.get_submodule(name)).__name__ == "TorchAtenAwqLinear", name
    assert type(loaded.get_output_embeddings()) is nn.Linear  # ... and the head stays in full precision

    diff, scale = _max_logit_diff(run)
    assert scale > 0.5  # the logits are not trivially small
    assert diff < 1e-3


def test_default_cpu_kernel_runs_the_artifact_close_to_fp32(awq_run):
    """What a user gets without pinning: gptqmodel's fused int4 kernel, bf16 activations."""
    run = awq_run("llama", group_size=64)
    ours = fake_quant_model(run.source, run.ckpt, method_for("awq", run.req.options))
    fused = load_awq(run.out, dense=False)
    ids = sample_ids(fused.config.vocab_size)
    with torch.no_grad():
        want, got = ours(ids).logits, fused(ids).logits
    # bf16 activations carry ~3 significant digits; relative to the largest logit, a few 1e-3 per op.
    assert (want - got).abs().max().item() < 0.03 * want.abs().max().item()
    assert (want.argmax(-1) == got.argmax(-1)).float().mean().item() > 0.95


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_folded_norms_and_biases_come_from_the_checkpoint(arch, awq_run):
    """Export takes every tensor AWQ changed from the checkpoint, once, never the stale source copy."""
    run = awq_run(arch, group_size=64)
    spec = ARCHITECTURES[arch]
    exported = load_file(run.out / "model.safetensors")
    source = load_file(run.source / "model.safetensors")
    norms = [g.prev for g in spec.groups if g.prev is not None and g.prev not in spec.linears]
    assert norms  # the table names the norms that feed the first linears
    for i, tensors in enumerate(checkpoint_layers(run.ckpt)):
        prefix = f"{spec.layers}.{i}."
        for norm in norms:
            for p in ("weight", "bias"):
                key = f"{norm}.{p}"
                if prefix + key not in source:
                    assert key not in tensors
                    continue
                assert torch.equal(exported[prefix + key], tensors[key])
                assert not torch.equal(exported[prefix + key], source[prefix + key]), f"{key} was not scaled"
        for name in spec.linears:
            assert prefix + name + ".weight" not in exported
            for k in ("qweight", "qzeros", "scales"):
                assert torch.equal(exported[prefix + f"{name}.{k}"], tensors[f"{name}.{k}"])
            if prefix + name + ".bias" in source:  # AWQ kernels hold the bias in fp16
                assert exported[prefix + name + ".bias"].dtype == torch.float16
                assert torch.equal(exported[prefix + name + ".bias"], tensors[name + ".bias"])
    # Nothing else went missing or changed: every tensor outside the layers is exported as is.
    for key, t in source.items():
        if not key.startswith(spec.layers + "."):
            assert torch.equal(exported[key], t), key


def test_v_to_o_fold_follows_shapes_not_class_names(awq_run):
    """v->o folding needs v_proj's outputs to be o_proj's inputs; GQA breaks that, so it is skipped."""
    from transformers import AutoModelForCausalLM

    from workers.engine.methods.awq import foldable

    run = awq_run("opt", group_size=64)
    src = load_file(run.source / "model.safetensors")
    ck = checkpoint_layers(run.ckpt)[0]
    v_bias = src["model.decoder.layers.0.self_attn.v_proj.bias"]
    assert not torch.allclose(ck["self_attn.v_proj.bias"].float(), v_bias.half().float(), atol=1e-3)  # divided by o's scales

    for arch, expected in (("llama", False), ("opt", True)):
        spec = ARCHITECTURES[arch]
        layer = AutoModelForCausalLM.from_pretrained(awq_run(arch, group_size=64).source).get_submodule(spec.layers)[0]
        v_to_o = spec.groups[1]
        assert v_to_o.prev == "self_attn.v_proj"
        assert foldable(layer, v_to_o) is expected  # llama: 64 v outputs (2 kv heads) feed 128 o inputs
        assert all(foldable(layer, g) for g in spec.groups if g is not v_to_o)


def test_symmetric_awq_writes_zero_points_of_eight_and_loads(awq_run):
    run = awq_run("llama", group_size=32, zero_point=False)
    assert run.result.quantization_config["zero_point"] is False
    tensors = checkpoint_layers(run.ckpt)[0]
    res = unpack_gemm({k: tensors[f"mlp.down_proj.{k}"] for k in ("qweight", "qzeros", "scales")}, 32)
    assert bool((res.zeros == 8).all())
    diff, _ = _max_logit_diff(run, seed=1)
    assert diff < 1e-3


def test_gemv_writes_the_same_codes_in_the_gemv_layout(awq_run):
    """No CPU kernel reads GEMV (gptqmodel's is CUDA-only), so compare against the GEMM run instead."""
    gemm, gemv = awq_run("llama", group_size=64), awq_run("llama", group_size=64, version="gemv")
    assert gemv.result.quantization_config["version"] == "gemv"
    a = fake_quant_model(gemm.source, gemm.ckpt, method_for("awq", gemm.req.options))
    b = fake_quant_model(gemv.source, gemv.ckpt, method_for("awq", gemv.req.options))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    t = checkpoint_layers(gemv.ckpt)[0]
    assert t["self_attn.q_proj.qweight"].shape == (128, 128 // 8)  # [out, in/8]: GEMV packs the input dim
    # 2 groups, padded to 2 words of 8 (the CUDA kernel's multiple for group size 64)
    assert t["self_attn.q_proj.scales"].shape == (128, 16) and t["self_attn.q_proj.qzeros"].shape == (128, 2)
