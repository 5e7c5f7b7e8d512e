"""AWQ and bitsandbytes options: bad ones are rejected at submit, naming the field; good ones reach the engine."""

from __future__ import annotations

import pytest

from quantfarm.errors import BadRequest, ValidationFailed
from quantfarm.spec import AWQOptions, BnB4Options, parse_spec
from workers.engine.methods import METHODS, method_for
from workers.engine.methods.awq import AWQMethod

MODEL = {"source": "local", "path": "/models/tiny"}


@pytest.mark.parametrize(
    "method,options,field,why",
    [
        ("awq", {"w_bit": 4}, "options.w_bit", "unknown field"),
        ("awq", {"q_group_size": 128}, "options.q_group_size", "unknown field"),
        ("awq", {"bits": 8}, "options.bits", "Input should be 4"),
        ("awq", {"version": "marlin"}, "options.version", "Input should be 'gemm' or 'gemv'"),
        ("awq", {"group_size": 96}, "options.group_size", "Input should be 32, 64 or 128"),
        ("bnb-4bit", {"bnb_4bit_quant_type": "nf4"}, "options.bnb_4bit_quant_type", "unknown field"),
        ("bnb-4bit", {"threshold": 6.0}, "options.threshold", "unknown field"),
        ("bnb-4bit", {"quant_type": "int4"}, "options.quant_type", "Input should be 'nf4' or 'fp4'"),
        ("bnb-4bit", {"compute_dtype": "float8"}, "options.compute_dtype", "Input should be 'float16', 'bfloat16' or 'float32'"),
        ("bnb-8bit", {"quant_type": "nf4"}, "options.quant_type", "unknown field"),
        ("bnb-8bit", {"threshold": -1}, "options.threshold", "Input should be greater than or equal to 0"),
    ],
)
def test_parse_spec_rejects_bad_options_naming_them(method, options, field, why):
    body = {"model": MODEL, "method": method, "options": options}
    with pytest.raises(ValidationFailed) as err:
        parse_spec(body)
    assert err.value.http_status == 422 and err.value.code == "validation_error"
    assert err.value.details["fields"] == {field: why}
    assert field in err.value.message
    assert body["options"] == options  # the caller's body is left as it was


def test_parse_spec_accepts_awq_and_bnb_options_as_documented():
    awq = parse_spec({"model": MODEL, "method": "awq", "options": {"group_size": 64, "zero_point": False, "version": "gemv"}})
    assert awq.options == AWQOptions(group_size=64, zero_point=False, version="gemv")
    bnb = parse_spec({"model": MODEL, "method": "bnb-4bit", "options": {"quant_type": "fp4", "skip_modules": ["lm_head"]}})
    assert bnb.options == BnB4Options(quant_type="fp4", skip_modules=["lm_head"])
    assert parse_spec({"model": MODEL, "method": "bnb-8bit"}).options.threshold == 6.0


def test_registry_lists_every_method_of_the_spec():
    from quantfarm.spec import METHODS as SPEC_METHODS

    assert sorted(METHODS) == sorted(SPEC_METHODS)
    assert isinstance(method_for("awq", AWQOptions()), AWQMethod)
    with pytest.raises(BadRequest) as err:
        method_for("squeezellm", AWQOptions())
    assert err.value.code == "unknown_method"
    assert "awq, bnb-4bit, bnb-8bit, fp8, gguf, gptq, loftq, rtn" in err.value.message


def test_awq_method_declares_its_format_and_needs():
    m = method_for("awq", AWQOptions(group_size=32, zero_point=False))
    assert m.format == "awq" and m.requires_calibration is True
    assert m.quantization_config() == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False, "version": "gemm", "modules_to_not_convert": None,
    }
    from workers.engine.arch import ARCHITECTURES

    dropped = m.replaced_weights(ARCHITECTURES["opt"])
    assert {"fc1.weight", "fc1.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "final_layer_norm.bias"} <= dropped
    assert not any("embed" in n or n.startswith("model.") for n in dropped)


def test_gguf_takes_an_importance_matrix_only_for_k_quants():
    from pydantic import ValidationError

    from quantfarm.spec import GGUFOptions

    assert GGUFOptions(quant_type="Q4_K_M", imatrix=True).imatrix is True
    with pytest.raises(ValidationError, match="imatrix weights the k-quant search of Q4_K_M; Q8_0 rounds to nearest"):
        GGUFOptions(imatrix=True)
    assert method_for("gguf", GGUFOptions(quant_type="Q4_K_M", imatrix=True)).requires_calibration is True
    assert method_for("gguf", GGUFOptions(quant_type="Q4_K_M")).requires_calibration is False
