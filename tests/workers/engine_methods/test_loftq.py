"""LoftQ: the NF4 base plus its LoRA adapter is closer to the float model than plain NF4, and the adapter loads in PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from quantfarm import spec
from quantfarm.errors import ValidationFailed
from storage.artifacts import LocalStore
from tests.workers.engine_methods.helpers import CALIB, CPU, sample_ids
from workers.engine.methods.loftq import loftq, nf4_roundtrip
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize


def _run(source, tmp, method, **options):
    req = QuantizeRequest(source_dir=source, method=method, options=spec.method_options()[method](**options), calibration=CALIB,
                          base_model="org/tiny")
    return quantize(req, LocalStore(tmp / f"{method}-ckpt"), tmp / method, device=CPU)


def test_loftq_alternation_shrinks_the_weight_error():
    torch.manual_seed(0)
    W = torch.randn(96, 128) * 0.05
    plain = float((nf4_roundtrip(W) - W).norm())
    errors = []
    for iterations in (1, 4):
        base, B, A = loftq(W, rank=8, iterations=iterations, dtype=torch.float32)
        assert B.shape == (96, 8) and A.shape == (8, 128) and torch.equal(base, W - B @ A)
        errors.append(float((nf4_roundtrip(base) + B @ A - W).norm()))
    assert errors[0] < plain and errors[1] <= errors[0]


def test_base_plus_adapter_is_closer_to_the_float_model_than_plain_nf4(tiny_source, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = tiny_source("llama")
    res = _run(source, tmp_path, "loftq", rank=16, iterations=3)
    plain = _run(source, tmp_path, "bnb-4bit", quant_type="nf4", double_quant=True, compute_dtype="float32")
    out = tmp_path / "loftq"
    assert res.outputs[0].format == "bitsandbytes-peft"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and cfg["base_model_name_or_path"] == "org/tiny"
    assert len(cfg["target_modules"]) == 2 * 7  # every linear of both decoder layers
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert str(source) not in (out / "adapter" / "adapter_config.json").read_text()
    assert res.quantization_config["loftq"] == {"bits": 4, "rank": 16, "iterations": 3, "adapter": "adapter"}

    ids = sample_ids(1000)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}).eval()  # a plain bnb checkpoint
        assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
        tuned = PeftModel.from_pretrained(base, out, subfolder="adapter").eval()  # as the card says
        got = tuned(ids).logits.float()
        nf4 = AutoModelForCausalLM.from_pretrained(plain.out_dir, device_map={"": "cpu"}).eval()(ids).logits.float()
    err_loftq, err_nf4 = float((got - ref).norm() / ref.norm()), float((nf4 - ref).norm() / ref.norm())
    assert err_loftq < 0.9 * err_nf4, (err_loftq, err_nf4)
    card = (out / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "<this repo or folder>", subfolder="adapter", is_trainable=True)' in card


def test_loftq_options_and_format_are_validated():
    body = {"model": {"source": "local", "path": "/m"}, "method": "loftq"}
    job = spec.parse_spec(body)
    assert job.formats == ["bitsandbytes-peft"] and (job.options.bits, job.options.rank, job.options.iterations) == (4, 16, 5)
    for options, field in (({"bits": 8}, "options.bits"), ({"rank": 0}, "options.rank"), ({"iterations": 50}, "options.iterations")):
        with pytest.raises(ValidationFailed) as err:
            spec.parse_spec({**body, "options": options})
        assert list(err.value.details["fields"]) == [field]
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({**body, "formats": ["bitsandbytes"]})
    assert err.value.details["fields"] == {"formats.0": "loftq cannot write 'bitsandbytes'; it writes: bitsandbytes-peft"}
