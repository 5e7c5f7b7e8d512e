"""compressed-tensors from GPTQ, AWQ and RTN codes: loaded by the real client, logits match the engine's model.

Symmetric artifacts load through transformers + compressed-tensors (``from_pretrained``
with no extra argument, as vLLM users type it). Asymmetric ones are decompressed by
compressed-tensors' own ``pack-quantized`` decompressor: compressed-tensors 0.20 builds
the loading model's zero points unpacked while its compressor (and llm-compressor, and
vLLM) packs them, so transformers refuses every asymmetric pack-quantized checkpoint,
including llm-compressor's own.
"""

from __future__ import annotations

import json

import pytest
import torch

from quantfarm import spec
from quantfarm.errors import ValidationFailed
from storage.artifacts import LocalStore
from tests.workers.engine.helpers import file_hashes
from tests.workers.engine_methods.helpers import CALIB, CPU, sample_ids
from workers.engine.arch import arch_for
from workers.engine.methods import method_for
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize

CT = "compressed-tensors"
CASES = [  # (method, natural format, options)
    ("gptq", "gptq", {"bits": 4, "group_size": 32, "sym": True}),
    ("gptq", "gptq", {"bits": 4, "group_size": -1, "sym": False}),
    ("gptq", "gptq", {"bits": 8, "group_size": 32, "sym": False, "desc_act": True, "static_groups": True}),
    ("gptq", "gptq", {"bits": 8, "group_size": -1, "sym": True, "desc_act": True}),
    ("rtn", "gptq", {"bits": 4, "group_size": -1, "sym": True}),
    ("rtn", "gptq", {"bits": 8, "group_size": 32, "sym": False}),
    ("awq", "awq", {"group_size": 32, "zero_point": False}),
    ("awq", "awq", {"group_size": 32, "zero_point": True}),
]
IDS = ["gptq-w4-g32-sym", "gptq-w4-ch-asym", "gptq-w8-g32-asym-actorder-static", "gptq-w8-ch-sym-actorder",
       "rtn-w4-ch-sym", "rtn-w8-g32-asym", "awq-g32-sym", "awq-g32-asym"]


def _run(source, tmp, method, natural, options, formats=None):
    req = QuantizeRequest(source_dir=source, method=method, options=spec.method_options()[method](**options), calibration=CALIB,
                          formats=formats or [natural, CT], base_model="tiny")
    return quantize(req, LocalStore(tmp / "ckpt"), tmp / "out", device=CPU)


def engine_model(source, ckpt_dir, method, options):
    """The source in float32 with every decoder layer set by the method's own ``apply`` from its checkpoints."""
    from transformers import AutoModelForCausalLM

    from tests.workers.engine.helpers import open_checkpoints

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu")
    arch = arch_for(model.config)
    m = method_for(method, spec.method_options()[method](**options))
    ckpt = open_checkpoints(LocalStore(ckpt_dir))
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        m.apply(arch.at(i), layer, ckpt.load(i))
    return model.eval()


def ct_decompressed(source, out):
    """The source model with every quantized linear decompressed by compressed-tensors from the artifact."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    tensors = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map="cpu")
    params = dict(model.named_parameters())
    names = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
    assert names
    for name in names:
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        model.get_submodule(name).weight.data = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
    for key, value in tensors.items():  # the rest (AWQ's folded norms, biases) as stored
        if key in params:
            params[key].data = value.to(torch.float32)
    return model.eval()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,natural,options", CASES, ids=IDS)
def test_compressed_tensors_loads_and_matches_the_engines_model(method, natural, options, tiny_source, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tiny_source("llama")
    res = _run(source, tmp_path, method, natural, options)
    (nat, ct) = res.outputs
    assert (nat.format, nat.out_dir, ct.format, ct.out_dir) == (natural, tmp_path / "out", CT, tmp_path / f"out-{CT}")
    qc = json.loads((ct.out_dir / "config.json").read_text())["quantization_config"]
    assert qc == ct.quantization_config and qc["quant_method"] == CT and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    scheme = method_for(method, spec.method_options()[method](**options)).int_scheme()
    assert (w["num_bits"], w["symmetric"]) == (scheme["bits"], scheme["sym"])
    assert (w["strategy"], w["group_size"]) == (("group", 32) if scheme["group_size"] == 32 else ("channel", None))
    assert qc["ignore"] == ["lm_head"]
    from compressed_tensors.quantization import QuantizationConfig

    assert QuantizationConfig.model_validate(qc).config_groups["group_0"].weights.num_bits == scheme["bits"]

    ids = sample_ids(1000)
    with torch.no_grad():
        ref = engine_model(source, tmp_path / "ckpt", method, options)(ids).logits
        if scheme["sym"]:
            loaded = AutoModelForCausalLM.from_pretrained(ct.out_dir, dtype=torch.float32, device_map="cpu").eval()
            q_proj = dict(loaded.model.layers[0].self_attn.q_proj.named_parameters())
            assert "weight_packed" in q_proj and q_proj["weight_packed"].dtype == torch.int32  # runs compressed
            got = loaded(ids).logits
        else:
            got = ct_decompressed(source, ct.out_dir)(ids).logits
    assert _rel(got, ref) < 1e-3
    card = (ct.out_dir / "README.md").read_text()
    assert f"into the `{CT}` format" in card and 'vllm serve "<this repo or folder>"' in card
    assert res.metrics["formats"] == {natural: {"size_bytes": nat.size_bytes}, CT: {"size_bytes": ct.size_bytes}}


def test_one_calibration_writes_both_formats_and_resumes_byte_identical(tiny_source, tmp_path):
    """The second format comes from the same checkpoints: a crashed run resumed writes the same bytes."""
    source = tiny_source("llama")
    options = {"bits": 4, "group_size": 32, "sym": False}
    full = _run(source, tmp_path / "full", "gptq", "gptq", options)

    class Crash(RuntimeError):
        pass

    def crash(report):
        if report.index == 0:
            raise Crash()

    req = QuantizeRequest(source_dir=source, method="gptq", options=spec.GPTQOptions(**options), calibration=CALIB, formats=["gptq", CT],
                          base_model="tiny")
    with pytest.raises(Crash):
        quantize(req, LocalStore(tmp_path / "resumed" / "ckpt"), tmp_path / "resumed" / "out", device=CPU, on_layer=crash)
    resumed = quantize(req, LocalStore(tmp_path / "resumed" / "ckpt"), tmp_path / "resumed" / "out", device=CPU)
    assert resumed.layers_replayed == [0] and resumed.layers_computed == [1]
    for a, b in zip(full.outputs, resumed.outputs):
        assert file_hashes(a.out_dir) == file_hashes(b.out_dir)
    # The compressed-tensors folder is its own: weights, config, card and tokenizer, no GPTQ tensors.
    from safetensors import safe_open

    with safe_open(full.outputs[1].out_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.endswith((".qweight", ".qzeros", ".g_idx"))]
    assert {"model.layers.0.self_attn.q_proj.weight_packed", "model.layers.0.self_attn.q_proj.weight_zero_point"} <= set(keys)
    assert {"tokenizer.json", "README.md", "config.json"} <= {p.name for p in full.outputs[1].out_dir.iterdir()}


@pytest.mark.parametrize("method,body,field,why", [
    ("gptq", {"formats": ["awq"]}, "formats.0", "gptq cannot write 'awq'; it writes: gptq, compressed-tensors"),
    ("awq", {"formats": ["gptq"]}, "formats.0", "awq cannot write 'gptq'; it writes: awq, compressed-tensors"),
    ("rtn", {"formats": ["bitsandbytes"]}, "formats.0", "rtn cannot write 'bitsandbytes'; it writes: gptq, compressed-tensors"),
    ("bnb-4bit", {"formats": [CT]}, "formats.0", f"bnb-4bit cannot write '{CT}'; it writes: bitsandbytes"),
    ("gptq", {"formats": [CT, CT]}, "formats", "each format at most once"),
    ("gptq", {"formats": []}, "formats", "List should have at least 1 item after validation, not 0"),
    ("gptq", {"formats": [CT], "options": {"bits": 3}}, "formats", f"{CT}: pack-quantized takes 4- or 8-bit codes, not 3-bit"),
    ("gptq", {"formats": [CT], "options": {"desc_act": True, "static_groups": False}}, "formats",
     f"{CT}: act-order without static_groups permutes the groups; set static_groups"),
])
def test_an_invalid_method_format_pair_names_the_valid_ones(method, body, field, why):
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": method, **body})
    assert err.value.http_status == 422 and err.value.details["fields"] == {field: why}


def test_formats_default_to_the_methods_natural_one():
    for method, natural in (("gptq", "gptq"), ("awq", "awq"), ("rtn", "gptq"), ("bnb-4bit", "bitsandbytes"), ("bnb-8bit", "bitsandbytes")):
        assert spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": method}).formats == [natural]
