"""bitsandbytes: the saved artifact reloads as a user loads it and computes what a direct load computes.

Runs bitsandbytes 0.50 on CPU against a tiny local Llama (the Hub is unreachable).
The comparison is exact: bitsandbytes quantizes the same float weights
deterministically, and ``save_pretrained`` stores the packed weights and their
quantization state losslessly, so a reloaded artifact and a direct load hold
identical tensors and run identical kernels.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from quantfarm.errors import BadRequest, DependencyMissing, NotAModel
from tests.workers.engine_methods.helpers import CALIB, CPU, bnb_request, sample_ids
from storage.artifacts import LocalStore
from workers.engine.bnb import source_skeleton
from workers.engine.methods import METHODS, LayerwiseMethod, method_for
from workers.engine.methods.bnb import BnBMethod
from workers.engine.run import quantize


def quantize_bnb(req, out_dir, *, device):
    """Run a bitsandbytes request through the engine's one entry point."""
    return quantize(req, LocalStore(out_dir.with_name(out_dir.name + "-ckpt")), out_dir, device=device)

CONFIGS = [
    ("bnb-4bit", {"quant_type": "nf4", "double_quant": True}),
    ("bnb-4bit", {"quant_type": "nf4", "double_quant": False}),
    ("bnb-4bit", {"quant_type": "fp4", "double_quant": True}),
    ("bnb-4bit", {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float32"}),
    ("bnb-8bit", {"threshold": 4.0}),
]
IDS = ["nf4-dq", "nf4", "fp4-dq", "fp4-fp32", "int8"]


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map={"": "cpu"}, dtype="auto", **kwargs).eval()


def _direct(run):
    """The source loaded straight through the same BitsAndBytesConfig, no save in between."""
    from transformers.quantizers.base import get_keys_to_not_convert

    method = method_for(run.req.method, run.req.options)
    return _load(run.source, quantization_config=method.bnb_config(get_keys_to_not_convert(source_skeleton(run.source))))


@pytest.mark.parametrize("method,options", CONFIGS, ids=IDS)
def test_bnb_artifact_reloads_and_matches_a_direct_load(method, options, bnb_run):
    run = bnb_run(method, **options)
    reloaded = _load(run.out)  # no quantization_config argument: it comes from config.json
    kind = "Linear4bit" if method == "bnb-4bit" else "Linear8bitLt"
    for layer in reloaded.model.layers:
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert type(layer.get_submodule(name)).__name__ == kind, name
    assert type(reloaded.lm_head) is nn.Linear  # the head stays in full precision, as transformers does

    ids = sample_ids(reloaded.config.vocab_size)
    with torch.no_grad():
        got, want = reloaded(ids).logits, _direct(run)(ids).logits
    assert want.abs().max() > 0.5
    assert torch.equal(got, want)

    qcfg = json.loads((run.out / "config.json").read_text())["quantization_config"]
    assert qcfg == run.result.quantization_config
    assert qcfg["quant_method"] == "bitsandbytes"
    if method == "bnb-4bit":
        assert qcfg["load_in_4bit"] is True and qcfg["load_in_8bit"] is False
        assert qcfg["bnb_4bit_quant_type"] == options["quant_type"]
        assert qcfg["bnb_4bit_use_double_quant"] is options["double_quant"]
        assert qcfg["bnb_4bit_compute_dtype"] == options.get("compute_dtype", "bfloat16")
    else:
        assert qcfg["load_in_8bit"] is True and qcfg["llm_int8_threshold"] == options["threshold"]
    assert qcfg["llm_int8_skip_modules"] is None

    m = run.result.metrics
    assert m["memory_footprint_before"] > m["memory_footprint_after"] > 0
    assert m["size_bytes_before"] > m["size_bytes_after"] > 0
    assert "perplexity_after" not in m  # evaluation was off
    assert m["_stages"] == ["exporting"]
    names = {p.name for p in run.out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= names
    card = (run.out / "README.md").read_text()
    assert f"with **{method}** into the `bitsandbytes` format" in card and "pip install transformers bitsandbytes" in card


@pytest.mark.parametrize("method,skip,kind", [("bnb-4bit", "mlp.down_proj", "Linear4bit"), ("bnb-8bit", "self_attn.o_proj", "Linear8bitLt")])
def test_skip_modules_stay_full_precision_after_reload(method, skip, kind, bnb_run):
    run = bnb_run(method, skip_modules=[skip])
    qcfg = json.loads((run.out / "config.json").read_text())["quantization_config"]
    assert qcfg["llm_int8_skip_modules"] == sorted(["lm_head", skip])  # added to transformers' own skips
    reloaded = _load(run.out)
    for layer in reloaded.model.layers:
        assert type(layer.get_submodule(skip)) is nn.Linear
        assert layer.get_submodule(skip).weight.dtype == torch.float32
        assert type(layer.self_attn.q_proj).__name__ == kind
    assert type(reloaded.lm_head) is nn.Linear
    # Keeping a module unquantized costs memory: the footprint sits between the source's and a full quantization's.
    base_method, base_options = CONFIGS[0] if method == "bnb-4bit" else CONFIGS[4]
    full = bnb_run(base_method, **base_options)
    assert run.result.metrics["memory_footprint_before"] > run.result.metrics["memory_footprint_after"] > full.result.metrics["memory_footprint_after"]


def test_memory_footprint_before_is_the_loaded_source_footprint(bnb_run):
    run = bnb_run("bnb-8bit", **CONFIGS[4][1])
    assert run.result.metrics["memory_footprint_before"] == _load(run.source).get_memory_footprint()
    assert run.result.metrics["memory_footprint_after"] == _load(run.out).get_memory_footprint()


def test_bnb_evaluation_uses_the_engines_held_out_ids(bnb_run, tmp_path):
    """Before: the source on the same windows the layer-wise engine scores; after: the reloaded artifact."""
    from quantfarm.spec import Evaluation, RTNOptions
    from storage.artifacts import LocalStore
    from workers.engine.calibration import evaluation_ids
    from workers.engine.pipeline import QuantizeRequest, load_tokenizer
    from workers.engine.run import quantize

    run = bnb_run("bnb-4bit", evaluate=True)
    m = run.result.metrics
    assert m["_stages"] == ["exporting", "evaluating"]
    rtn = quantize(
        QuantizeRequest(source_dir=run.source, method="rtn", options=RTNOptions(), calibration=CALIB, evaluate=True, evaluation=Evaluation(max_windows=4)),
        LocalStore(tmp_path / "ckpt"), tmp_path / "rtn", device=CPU,
    )
    assert m["eval_tokens"] == rtn.metrics["eval_tokens"] == 4 * CALIB.seq_len
    assert m["perplexity_before"] == pytest.approx(rtn.metrics["perplexity_before"], rel=1e-4)

    ids = evaluation_ids(Evaluation(max_windows=4), load_tokenizer(run.source), CALIB.seq_len)
    model = _load(run.out)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert m["perplexity_after"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert m["perplexity_after"] != m["perplexity_before"]
    card = (run.out / "README.md").read_text()
    assert "| perplexity_after |" in card and "| memory_footprint_after |" in card


def test_bnb_methods_are_ordinary_methods_that_quantize_the_whole_model():
    for name in ("bnb-4bit", "bnb-8bit"):
        cls = METHODS[name]
        assert issubclass(cls, BnBMethod) and not issubclass(cls, LayerwiseMethod) and cls.requires_calibration is False
        assert cls.format == "bitsandbytes"
        assert "quantize" in vars(BnBMethod)  # its own whole-model quantize, the one entry point run.quantize calls


def test_bnb_without_bitsandbytes_names_the_fix(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(DependencyMissing, match="pip install bitsandbytes") as err:
        quantize_bnb(bnb_request(tiny_source("llama"), "bnb-4bit"), tmp_path / "out", device=CPU)
    assert err.value.code == "dependency_missing"
    assert not (tmp_path / "out").exists()


def test_bnb_rejects_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not a model")
    with pytest.raises(NotAModel, match="no config.json"):
        quantize_bnb(bnb_request(tmp_path / "src", "bnb-8bit"), tmp_path / "out", device=CPU)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "src" / "notes.txt").read_text() == "not a model"


def test_bnb_refuses_a_format_it_cannot_write(tiny_source, tmp_path):
    req = bnb_request(tiny_source("llama"), "bnb-4bit")
    req.formats = ["gptq"]
    with pytest.raises(BadRequest, match="bnb-4bit writes bitsandbytes, not gptq") as err:
        quantize_bnb(req, tmp_path / "out", device=CPU)
    assert err.value.code == "unsupported_format"
    assert not (tmp_path / "out").exists()
