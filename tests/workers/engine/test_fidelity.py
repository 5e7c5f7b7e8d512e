"""Exported GPTQ models load in transformers and compute what the engine computed.

For every supported architecture (tiny random models built here: the Hub is
unreachable), the folder the engine writes is loaded with
``AutoModelForCausalLM.from_pretrained`` through optimum/gptqmodel's exact torch
kernel, and its logits are compared with the engine's own fake-quantized model: the
float32 source with each layer's weights set by ``method.apply`` from the layer
checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch

from quantfarm.errors import NotAModel, UnsupportedArchitecture
from tests.support.models import add_bert
from tests.workers.engine.helpers import fake_quantized, load_exported, logits, run_job
from workers.engine.arch import ARCHITECTURES

TOL = 1e-3

# (arch, desc_act) -> options: every arch with act-order on and off, across bits/groups/sym.
CASES = {
    ("llama", False): dict(bits=4, group_size=32, sym=True),
    ("llama", True): dict(bits=4, group_size=32, sym=False, static_groups=False),
    ("mistral", False): dict(bits=8, group_size=64, sym=True),
    ("mistral", True): dict(bits=3, group_size=128, sym=True),
    ("qwen2", False): dict(bits=2, group_size=-1, sym=False),
    ("qwen2", True): dict(bits=4, group_size=128, sym=True, static_groups=True),
    ("qwen3", False): dict(bits=4, group_size=64, sym=False, true_sequential=False),
    ("qwen3", True): dict(bits=4, group_size=64, sym=True),
    ("opt", False): dict(bits=4, group_size=32, sym=True),
    ("opt", True): dict(bits=8, group_size=128, sym=False),
    ("gemma2", False): dict(bits=4, group_size=64, sym=False),
    ("gemma2", True): dict(bits=4, group_size=128, sym=True),
    ("gemma3_text", True): dict(bits=4, group_size=64, sym=True),
    ("phi3", True): dict(bits=3, group_size=64, sym=False),
}
# One case of each family runs in `make test` (Llama-like, OPT, Gemma, Phi-3); the rest is the matrix.
REPRESENTATIVES = {("llama", True), ("opt", False), ("gemma3_text", True), ("phi3", True)}


def _case(arch, desc_act):
    return (arch, desc_act) if (arch, desc_act) in REPRESENTATIVES else pytest.param(arch, desc_act, marks=pytest.mark.matrix)


def test_cases_cover_every_architecture():
    assert {a for a, _ in CASES} == {a for a, spec in ARCHITECTURES.items() if spec.moe is None}  # MoE: test_moe.py


def _ids(vocab: int = 1024) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(0))


def assert_loads_like_engine(source, work, store, method, options):
    exported = load_exported(work / "out", options["bits"])
    proj = next(m for n, m in exported.named_modules() if n.endswith(("layers.0.self_attn.o_proj", "layers.0.self_attn.out_proj")))
    assert hasattr(proj, "qweight") and proj.qweight.dtype == torch.int32  # really a quantized kernel
    ours = fake_quantized(source, store, method, **options)
    ids = _ids(ours.config.vocab_size)
    got, want = logits(exported, ids), logits(ours, ids)
    diff = float((got - want).abs().max())
    assert diff < TOL, f"exported logits differ from the engine's by {diff:.2e}"
    from transformers import AutoModelForCausalLM

    source_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu")
    moved = float((logits(source_model, ids) - want).abs().max())
    assert moved > 10 * TOL, f"quantization changed the logits by only {moved:.1e}; the comparison would prove nothing"


@pytest.mark.parametrize("arch,desc_act", [_case(*c) for c in CASES])
def test_gptq_export_matches_fake_quantized(tiny_model, tmp_path, arch, desc_act):
    options = dict(CASES[arch, desc_act], desc_act=desc_act)
    source = tiny_model(arch, shard="300KB" if arch == "llama" else None)
    res, store = run_job(source, tmp_path, "gptq", **options)
    assert res.layers_computed == [0, 1] and res.layers_replayed == []
    assert_loads_like_engine(source, tmp_path, store, "gptq", options)

    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": options["bits"], "group_size": options["group_size"],
        "desc_act": desc_act, "sym": options["sym"], "checkpoint_format": "gptq",
    }
    assert qc["static_groups"] == options.get("static_groups", True)
    assert qc["true_sequential"] == options.get("true_sequential", True)
    assert res.quantization_config == qc


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_streamed_perplexity_equals_transformers_on_mixed_attention(tiny_model, tmp_path, arch):
    """Gemma's sliding and global layers get their own masks and rotary tables; Gemma 2 caps its logits.

    The calibration windows (64 tokens) are longer than the sliding window (32), so a
    layer fed another kind's mask would compute something else.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.trained import heldout_perplexity, heldout_windows

    source = tiny_model(arch)
    res, _ = run_job(source, tmp_path, "rtn", evaluate=True, evaluation={"max_windows": 4}, bits=4, group_size=128, sym=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu")
    assert model.config.sliding_window < 64 and len(set(model.config.layer_types)) == 2
    windows = heldout_windows(AutoTokenizer.from_pretrained(source), 64, 4)
    assert res.metrics["perplexity_before"] == pytest.approx(heldout_perplexity(model, windows), rel=1e-5)


def test_rtn_export_matches_fake_quantized(tiny_model, tmp_path):
    options = dict(bits=4, group_size=128, sym=True)
    source = tiny_model("llama")
    res, store = run_job(source, tmp_path, "rtn", **options)
    assert res.layers_computed == [0, 1]
    assert_loads_like_engine(source, tmp_path, store, "rtn", options)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == ("gptq", 4, 128, False, True)
    assert qc["meta"]["method"] == "rtn"


def test_export_layout(tiny_model, tmp_path):
    """Sharded weights with a valid index, tokenizer and generation config copied, a model card."""
    source = tiny_model("llama", shard="300KB")
    res, _ = run_job(source, tmp_path, "gptq", max_shard_bytes=150_000, bits=4, group_size=32, desc_act=True)
    out = tmp_path / "out"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    from safetensors import safe_open

    stored, total = {}, 0
    for name in shards:
        with safe_open(out / name, framework="pt") as f:
            for key in f.keys():
                stored[key] = name
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    # Quantized linears replace their float weights; everything else comes from the source.
    assert "model.layers.0.self_attn.q_proj.qweight" in stored and "model.layers.0.self_attn.q_proj.weight" not in stored
    assert {"model.layers.1.mlp.down_proj.g_idx", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(stored)
    assert not any(name.startswith(".shard") for name in (p.name for p in out.iterdir()))

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2

    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"test/tiny\"\n")
    for section in ("## Quantization", "## Calibration", "## Evaluation", "## How to load"):
        assert section in card
    assert "| desc_act | `true` |" in card and "| group_size | `32` |" in card
    assert "- num_samples: `8`" in card and "- seq_len: `64`" in card and "Not evaluated." in card
    assert "quantfarm" in card and "gptq" in card
    assert res.metrics["size_bytes_after"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    source = add_bert(tmp_path / "bert")
    with pytest.raises(UnsupportedArchitecture) as err:
        run_job(source, tmp_path, "rtn")
    e = err.value
    assert e.code == "unsupported_architecture"
    assert "'bert'" in e.message and ", ".join(sorted(ARCHITECTURES)) in e.message
    assert {"llama", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"} <= set(e.details["supported"])
    assert e.details["supported"] == sorted(ARCHITECTURES)
    assert not (tmp_path / "out").exists() and not any((tmp_path / "ckpt").iterdir())


def test_directory_without_weights_is_not_a_model(tiny_model, tmp_path):
    source = tiny_model("llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((source / "config.json").read_bytes())
    (bare / "pytorch_model.bin.txt").write_text("not weights")
    with pytest.raises(NotAModel) as err:
        run_job(bare, tmp_path, "rtn")
    assert err.value.code == "not_a_model"
    assert "no safetensors weights" in err.value.message and "convert the model to safetensors" in err.value.message
    assert err.value.details["files"] == ["config.json", "pytorch_model.bin.txt"]
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAModel, match="has no config.json"):
        run_job(empty, tmp_path, "rtn")


def test_half_precision_source(tokenizer_dir, tmp_path):
    """An fp16 checkpoint: computed in float32 on CPU, copied tensors keep their fp16 bytes."""
    from safetensors import safe_open

    from tests.support.models import make_tiny_model
    from workers.engine.model import compute_dtype

    assert compute_dtype(torch.float16, torch.device("cpu")) == torch.float32  # fp16 matmul is slow on CPU
    assert compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    source = make_tiny_model(tmp_path / "fp16", "llama", tokenizer_dir=tokenizer_dir, dtype=torch.float16)
    options = dict(bits=4, group_size=64, sym=True, desc_act=True)
    _, store = run_job(source, tmp_path, "gptq", **options)
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as out, \
            safe_open(source / "model.safetensors", framework="pt") as src:
        assert out.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
            assert torch.equal(out.get_tensor(name), src.get_tensor(name)) and out.get_tensor(name).dtype == torch.float16
    assert_loads_like_engine(source, tmp_path, store, "gptq", options)
