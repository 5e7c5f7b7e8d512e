"""Mixture-of-experts models: every expert quantized from its own statistics, loadable by GPTQModel.

Tiny random Mixtral / Qwen2-MoE (with a shared expert) / Qwen3-MoE / DeepSeek-V2 (latent
attention, shared experts) models are built here (the Hub is unreachable). transformers
fuses each block's experts into 3-D tensors; the engine gives every expert its own
linears, named as GPTQModel names them, and GPTQModel loads the artifact back. The engine's own dequantized model is
the float source with its experts unfused (``moe.unfuse_loaded``) and each layer's
checkpoint applied.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.models import make_tiny_model
from tests.workers.engine.helpers import OPTIONS, file_hashes, logits, open_checkpoints, run_job
from workers.engine.arch import ARCHITECTURES, arch_for
from workers.engine.methods import method_for
from workers.engine.moe import unfuse_loaded

GPTQ = dict(bits=4, group_size=64, sym=True)
EXPERTS = 4
DEAD = (2, 3)  # experts the router of the "dead experts" model never picks


def engine_model(source, store, method: str, **options):
    """The float source with unfused experts and every layer set by ``method.apply`` from its checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu").eval()
    arch = arch_for(model.config)
    unfuse_loaded(model, arch)
    m = method_for(method, OPTIONS[method](**options))
    ckpt = open_checkpoints(store)
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        m.apply(arch, layer, ckpt.load(i))
    return model


_LOAD = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
# The torch kernel loads in half precision; float32 after loading (fp16 scales stay exact).
m = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.float().eval()
assert hasattr(m.get_submodule("model.layers.1.mlp.experts.3.down_proj"), "qweight")  # a quantized kernel per expert
ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(m(input_ids=ids).logits.float(), sys.argv[2])
"""


def gptqmodel_logits(out_dir, dest) -> torch.Tensor:
    """Load the artifact with ``GPTQModel.load`` in a child process and return its logits on ``_ids()``.

    A child, because GPTQModel swaps transformers' MoE classes process-wide on load
    (its defuser), after which transformers saves Mixtral checkpoints other tests build wrongly.
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LOAD, str(out_dir), str(dest)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(dest)


def _ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))


def test_unfused_experts_compute_what_transformers_computes(tiny_model):
    from transformers import AutoModelForCausalLM

    source = tiny_model("qwen2_moe")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    want = logits(model, _ids())
    unfuse_loaded(model, arch_for(model.config))
    assert torch.allclose(logits(model, _ids()), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", *(pytest.param(a, marks=pytest.mark.matrix) for a in ("qwen2_moe", "qwen3_moe", "deepseek_v2"))])
def test_gptq_moe_loads_in_gptqmodel_like_the_engine(tiny_model, tmp_path, arch):
    source = tiny_model(arch)
    res, store = run_job(source, tmp_path, "gptq", **GPTQ)
    names = set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (tmp_path / "out" / "model.safetensors.index.json").exists() else set(load_file(tmp_path / "out" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in names and "model.layers.0.mlp.gate.weight" in names
    assert not any("block_sparse_moe" in n or n.endswith("experts.gate_up_proj") for n in names)

    got = gptqmodel_logits(tmp_path / "out", tmp_path / "logits.pt")
    want = logits(engine_model(source, store, "gptq", **GPTQ), _ids())
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())
    counts = res.metrics["expert_tokens"]
    assert set(counts) == {"0", "1"} and all(len(c["mlp"]) == EXPERTS for c in counts.values())
    assert all(sum(c["mlp"]) == 2 * 8 * 64 for c in counts.values())  # top-2 of every calibration token


def _dead_experts(model_dir):
    """Make the router never pick experts 2 and 3: channel 0 of every embedding is large and
    positive, and those experts' router rows are experts 0 and 1's minus 100 on that channel."""
    sd = load_file(model_dir / "model.safetensors")
    sd["model.embed_tokens.weight"][:, 0] = 30.0
    for key in [k for k in sd if k.endswith("mlp.gate.weight")]:
        w = sd[key]
        w[DEAD[0]], w[DEAD[1]] = w[0].clone(), w[1].clone()
        w[list(DEAD), 0] -= 100.0
    save_file(sd, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def dead(tmp_path_factory, tokenizer_dir):
    return _dead_experts(make_tiny_model(tmp_path_factory.mktemp("dead") / "m", "qwen3_moe", tokenizer_dir=tokenizer_dir))


@pytest.fixture(scope="module")
def dead_runs(dead, tmp_path_factory):
    runs = {}
    for mode in ("routed", "all_experts"):
        work = tmp_path_factory.mktemp(mode)
        res, store = run_job(dead, work, "gptq", moe_calibration=mode, **GPTQ)
        runs[mode] = (res, open_checkpoints(store))
    return runs


def test_experts_the_router_never_picks_are_counted_and_rounded(dead_runs, dead):
    res, ckpt = dead_runs["routed"]
    src = load_file(dead / "model.safetensors")
    for i in range(2):
        counts = res.metrics["expert_tokens"][str(i)]["mlp"]
        assert [counts[e] for e in DEAD] == [0, 0] and sum(counts) == 2 * 8 * 64
        assert sorted(res.metrics["rtn_experts"][str(i)]) == sorted(
            f"mlp.experts.{e}.{p}" for e in DEAD for p in ("gate_proj", "up_proj", "down_proj"))
        tensors = ckpt.load(i)
        for key, t in tensors.items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), key
        from workers.engine.quant import rtn_quantize
        from workers.engine.pack import pack_gptq

        for e in DEAD:  # no tokens: round to nearest, exactly
            name = f"mlp.experts.{e}.gate_proj"
            want = pack_gptq(rtn_quantize(src[f"model.layers.{i}.{name}.weight"], bits=4, group_size=64, sym=True), 4)
            assert torch.equal(tensors[f"{name}.qweight"], want["qweight"])


def test_all_experts_gives_unrouted_experts_their_own_solve(dead_runs):
    routed, all_experts = dead_runs["routed"][1], dead_runs["all_experts"][1]
    assert dead_runs["all_experts"][0].metrics["rtn_experts"] == {}
    # The routed counts are the router's either way.
    assert dead_runs["all_experts"][0].metrics["expert_tokens"] == dead_runs["routed"][0].metrics["expert_tokens"]
    for i in range(2):
        a, b = routed.load(i), all_experts.load(i)
        for e in DEAD:
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert not torch.equal(a[f"mlp.experts.{e}.{p}.qweight"], b[f"mlp.experts.{e}.{p}.qweight"]), (i, e, p)
        assert torch.equal(a["self_attn.q_proj.qweight"], b["self_attn.q_proj.qweight"])  # attention is unaffected


@pytest.mark.parametrize("arch", ["mixtral", pytest.param("deepseek_v2", marks=pytest.mark.matrix)])
def test_moe_resume_after_a_crash_is_byte_identical(tiny_model, tmp_path, arch):
    class Crash(RuntimeError):
        pass

    source = tiny_model(arch, layers=3)
    whole, _ = run_job(source, tmp_path / "whole", "gptq", **GPTQ)

    def crash_after_first(report):
        if report.index == 0:
            raise Crash

    with pytest.raises(Crash):
        run_job(source, tmp_path / "resumed", "gptq", on_layer=crash_after_first, **GPTQ)
    resumed, _ = run_job(source, tmp_path / "resumed", "gptq", **GPTQ)
    assert resumed.layers_replayed == [0] and resumed.layers_computed == [1, 2]
    assert file_hashes(tmp_path / "resumed" / "out") == file_hashes(tmp_path / "whole" / "out")
    assert resumed.metrics["expert_tokens"] == whole.metrics["expert_tokens"]


def test_moe_layers_that_are_not_all_sparse_are_refused(tmp_path, tokenizer_dir):
    from transformers import Qwen3MoeConfig

    from quantfarm.errors import UnsupportedArchitecture

    cfg = Qwen3MoeConfig(num_hidden_layers=2, mlp_only_layers=[1])
    with pytest.raises(UnsupportedArchitecture, match="mlp_only_layers"):
        arch_for(cfg)
    from transformers import DeepseekV2Config

    with pytest.raises(UnsupportedArchitecture, match="first_k_dense_replace"):
        arch_for(DeepseekV2Config(num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=None))
    with pytest.raises(UnsupportedArchitecture, match="q_lora_rank"):
        arch_for(DeepseekV2Config(num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=64))
    lite = arch_for(DeepseekV2Config(num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=None, n_routed_experts=4))
    assert "self_attn.kv_b_proj" in lite.linears and "mlp.shared_experts.down_proj" in lite.linears
    assert "mlp.experts.3.down_proj" in lite.linears
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2"} <= set(ARCHITECTURES)


def test_awq_rounds_experts_without_tokens_plainly_and_scales_the_rest(dead, tmp_path):
    """AWQ calibrates experts on the tokens the router sends them; one sent nothing is rounded unscaled."""
    from storage.artifacts import LocalStore
    from tests.workers.engine_methods.helpers import awq_request
    from workers.engine.awq_pack import dequantize_awq
    from workers.engine.methods.awq import awq_quantize
    from workers.engine.run import quantize

    res = quantize(awq_request(dead, group_size=64, evaluate=True), LocalStore(tmp_path / "ckpt"), tmp_path / "out",
                   device=torch.device("cpu"))
    assert torch.isfinite(torch.tensor(res.metrics["perplexity_after"]))
    src = load_file(dead / "model.safetensors")
    from tests.workers.engine_methods.helpers import checkpoint_layers

    for i, tensors in enumerate(checkpoint_layers(tmp_path / "ckpt")):
        for key, t in tensors.items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), key
        moved = []
        for e in range(EXPERTS):
            for p in ("gate_proj", "up_proj", "down_proj"):
                name = f"mlp.experts.{e}.{p}"
                got = dequantize_awq({k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}, 64, "gemm").float()
                plain = awq_quantize(src[f"model.layers.{i}.{name}.weight"], group_size=64, zero_point=True).dequantize()
                if e in DEAD:
                    assert torch.equal(got, plain), (i, name)
                else:
                    moved.append(not torch.equal(got, plain))
        assert any(moved)  # routed experts were scaled or clipped: the test can tell
