"""Mixture-of-experts models: every expert quantized from its own statistics, loadable by GPTQModel.

Tiny random Mixtral / Qwen2-MoE (with a shared expert) / Qwen3-MoE / DeepSeek-V2 (latent
attention, shared experts; V2-Lite's dense first layer; V2's low-rank queries) models are
built here (the Hub is unreachable). transformers fuses each block's experts into 3-D
tensors; the engine gives every expert its own linears, named as GPTQModel names them,
and GPTQModel loads the artifact back (compared as ``moe_load`` says). The engine's own
dequantized model is the float source with its experts unfused (``moe.unfuse_loaded``)
and each layer's checkpoint applied.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.models import make_tiny_model
from tests.workers.engine.moe_load import assert_loads_as_the_engine, gptqmodel_load
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
        m.apply(arch.at(i), layer, ckpt.load(i))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0))


def test_unfused_experts_compute_what_transformers_computes(tiny_model):
    from transformers import AutoModelForCausalLM

    source = tiny_model("qwen2_moe")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    want = logits(model, _ids())
    unfuse_loaded(model, arch_for(model.config))
    assert torch.allclose(logits(model, _ids()), want, rtol=0, atol=1e-5)


GPTQ_LOADS = [
    pytest.param("mixtral", {}, id="mixtral"),
    *(pytest.param(a, {}, id=a, marks=pytest.mark.matrix) for a in ("qwen2_moe", "qwen3_moe", "deepseek_v2")),
    # DeepSeek-V2-Lite's layout: a dense first layer (first_k_dense_replace=1), then sparse blocks
    pytest.param("deepseek_v2", {"layers": 3, "first_k_dense_replace": 1}, id="deepseek_v2_lite", marks=pytest.mark.matrix),
    # the full DeepSeek-V2's low-rank queries (q_a_proj, q_a_layernorm, q_b_proj)
    pytest.param("deepseek_v2", {"q_lora_rank": 128}, id="deepseek_v2_q_lora", marks=pytest.mark.matrix),
    # (Qwen's dense layers between sparse ones are not here: GPTQModel's module tree for Qwen MoE has
    # sparse layers only, so it leaves a dense layer's quantized MLP unloaded; vLLM's Qwen MoE models
    # build those MLPs as quantized linears. See test_qwen_dense_layers_quantize_and_resume.)
]


def exported_names(out) -> set[str]:
    index = out / "model.safetensors.index.json"
    return set(json.loads(index.read_text())["weight_map"]) if index.exists() else set(load_file(out / "model.safetensors"))


@pytest.mark.parametrize(("arch", "config"), GPTQ_LOADS)
def test_gptq_moe_loads_in_gptqmodel_like_the_engine(tiny_model, tmp_path, arch, config):
    from transformers import AutoConfig

    source = tiny_model(arch, **config)
    table = arch_for(AutoConfig.from_pretrained(source))
    sparse = [i for i in range(config.get("layers", 2)) if table.sparse(i)]
    res, store = run_job(source, tmp_path, "gptq", **GPTQ)
    names = exported_names(tmp_path / "out")
    for i in range(config.get("layers", 2)):
        p = f"model.layers.{i}."
        if i in sparse:
            assert p + "mlp.experts.3.down_proj.qweight" in names and p + "mlp.gate.weight" in names
        else:  # a dense MLP, quantized like any other
            assert p + "mlp.down_proj.qweight" in names and not any(n.startswith(p + "mlp.experts.") for n in names)
        assert {p + f"{n}.qweight" for n in table.at(i).linears} <= names
    assert not any("block_sparse_moe" in n or n.endswith("experts.gate_up_proj") for n in names)

    loaded = gptqmodel_load(tmp_path / "out", tmp_path / "loaded.pt")
    assert loaded["kinds"] == ["TorchLinear"]  # GPTQModel's torch GPTQ kernel
    quantized = {f"{table.layers}.{i}.{n}.weight" for i in range(config.get("layers", 2)) for n in table.at(i).linears}
    assert_loads_as_the_engine(loaded, engine_model(source, store, "gptq", **GPTQ), quantized)
    counts = res.metrics["expert_tokens"]
    assert set(counts) == {str(i) for i in sparse} and all(len(c["mlp"]) == EXPERTS for c in counts.values())
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


# V2-Lite's layout (a dense first layer, replayed, then sparse ones) runs in make test: a few seconds.
@pytest.mark.parametrize(("arch", "config"), [("mixtral", {}), pytest.param("deepseek_v2", {}, marks=pytest.mark.matrix),
                                               pytest.param("deepseek_v2", {"first_k_dense_replace": 1}, id="deepseek_v2_lite")])
def test_moe_resume_after_a_crash_is_byte_identical(tiny_model, tmp_path, arch, config):
    class Crash(RuntimeError):
        pass

    source = tiny_model(arch, layers=3, **config)
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


def test_qwen_dense_layers_quantize_and_resume(tiny_model, tmp_path):
    """A Qwen2-MoE (shared expert) whose middle layer is dense (mlp_only_layers): its plain MLP is quantized
    like any dense model's, the sparse layers' experts as usual, and a resume is byte-identical."""
    class Crash(RuntimeError):
        pass

    source = tiny_model("qwen2_moe", layers=3, mlp_only_layers=[1])
    whole, _ = run_job(source, tmp_path / "whole", "gptq", **GPTQ)
    names = exported_names(tmp_path / "whole" / "out")
    for i, sparse in enumerate([True, False, True]):
        p = f"model.layers.{i}.mlp."
        assert (p + "experts.3.down_proj.qweight" in names) is sparse and (p + "shared_expert.down_proj.qweight" in names) is sparse
        assert (p + "down_proj.qweight" in names) is not sparse and (p + "gate_proj.qweight" in names) is not sparse
        assert not any(n.startswith(p) and n.endswith(".weight") and "proj" in n and "shared_expert_gate" not in n
                       for n in names), i  # every projection quantized, none left in float
    assert set(whole.metrics["expert_tokens"]) == {"0", "2"}  # counted where there are experts

    def crash_after_first(report):
        if report.index == 1:
            raise Crash

    with pytest.raises(Crash):
        run_job(source, tmp_path / "resumed", "gptq", on_layer=crash_after_first, **GPTQ)
    resumed, _ = run_job(source, tmp_path / "resumed", "gptq", **GPTQ)
    assert resumed.layers_replayed == [0, 1] and resumed.layers_computed == [2]
    assert file_hashes(tmp_path / "resumed" / "out") == file_hashes(tmp_path / "whole" / "out")


def test_qwen_dense_layers_are_read_from_the_config_as_transformers_builds_them():
    """mlp_only_layers and decoder_sparse_step put a plain MLP where transformers does; bad values are refused clearly."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

    from quantfarm.errors import UnsupportedArchitecture
    from workers.engine.arch import sparse_layers

    small = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, num_experts=4)
    cases = [(Qwen3MoeConfig, dict(num_hidden_layers=4, mlp_only_layers=[1, 7]), [True, False, True, True]),
             (Qwen3MoeConfig, dict(num_hidden_layers=4, decoder_sparse_step=2), [False, True, False, True]),
             (Qwen2MoeConfig, dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]), [False, True, False, False]),
             (Qwen2MoeConfig, dict(num_hidden_layers=2), [True, True])]
    for cls, kw, want in cases:
        cfg = cls(**small, **kw)
        table = arch_for(cfg)
        assert [table.sparse(i) for i in range(len(want))] == want, kw
        built = AutoModelForCausalLM.from_config(cfg).model.layers  # what transformers builds, layer by layer
        assert [hasattr(layer.mlp, "experts") for layer in built] == want, kw
        for i, sparse in enumerate(want):  # each layer's groups name exactly the linears that layer has
            have = {n for n, m in built[i].named_modules() if isinstance(m, torch.nn.Linear)}
            names = set(table.at(i).linears)
            assert names <= have or sparse, (kw, i, names - have)  # sparse: transformers fuses experts, the engine unfuses
            assert ("mlp.down_proj" in names) is not sparse, (kw, i)
    dense = arch_for(Qwen3MoeConfig(**{**small, "num_experts": 0}, num_hidden_layers=2))
    assert sparse_layers(dense, Qwen3MoeConfig(**{**small, "num_experts": 0}, num_hidden_layers=2)) == [False, False]
    assert not any("experts" in n for n in dense.linears) and "mlp.down_proj" in dense.linears

    for attr, value, says in [("mlp_only_layers", "1", "mlp_only_layers must be a list of layer indices"),
                              ("mlp_only_layers", [1.5], "mlp_only_layers must be a list of layer indices"),
                              ("decoder_sparse_step", 0, "decoder_sparse_step must be a whole number of at least 1"),
                              ("decoder_sparse_step", "2", "decoder_sparse_step must be a whole number"),
                              ("num_experts", -1, "num_experts must be a whole number")]:
        cfg = Qwen3MoeConfig(**small, num_hidden_layers=2)
        cfg.__dict__[cfg.attribute_map.get(attr, attr)] = value  # past transformers' field checks: the table must not rely on them
        with pytest.raises(UnsupportedArchitecture, match=says):
            arch_for(cfg)
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2"} <= set(ARCHITECTURES)


def test_deepseek_layers_get_their_own_groups_from_the_table():
    """V2-Lite's dense first layers and the full V2's low-rank queries are table data, layer by layer."""
    from transformers import DeepseekV2Config

    lite = arch_for(DeepseekV2Config(num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=None, n_routed_experts=4))
    assert [lite.sparse(i) for i in range(4)] == [False, False, True, True]
    attn = ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj")
    assert lite.at(0).linears == (*attn, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert lite.at(0).groups == lite.at(1).groups and lite.at(2).groups == lite.at(3).groups
    sparse = lite.at(2).linears
    assert sparse[:4] == attn and "mlp.experts.3.down_proj" in sparse and "mlp.shared_experts.down_proj" in sparse
    assert "mlp.gate_proj" not in sparse
    assert {g.prev for g in lite.at(0).groups if "mlp.gate_proj" in g.names} == {"post_attention_layernorm"}  # AWQ folds there
    assert set(lite.linears) == set(lite.at(0).linears) | set(sparse)  # the model-wide names: every kind's

    from quantfarm.errors import UnsupportedArchitecture

    cfg = DeepseekV2Config(num_hidden_layers=2, n_routed_experts=4)
    cfg.first_k_dense_replace = -1  # transformers' own config checks refuse other types
    with pytest.raises(UnsupportedArchitecture, match="first_k_dense_replace must be a whole number"):
        arch_for(cfg)
    uniform = arch_for(DeepseekV2Config(num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=None, n_routed_experts=4))
    assert uniform.layer_groups == () and uniform.at(1) is uniform and uniform.sparse(0)

    full = arch_for(DeepseekV2Config(num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=64, n_routed_experts=4))
    assert full.linears[:5] == ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_b_proj",
                                "self_attn.kv_b_proj", "self_attn.o_proj")
    assert "self_attn.q_proj" not in full.linears
    assert [g.prev for g in full.groups[:2]] == ["input_layernorm", "self_attn.q_a_layernorm"]


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
