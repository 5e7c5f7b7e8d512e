"""compressed-tensors ``pack-quantized`` (W4A16 / W8A16): what llm-compressor writes and vLLM serves.

The integer codes GPTQ, AWQ and RTN checkpoint carry over unchanged: a code
``q`` in ``[0, 2**bits)`` is the signed value ``q - 2**(bits-1)`` that
compressed-tensors stores with that same offset, packed 32 values into
``bits`` int32 words along the input dimension (for 4 and 8 bits this is also
the older 8-or-4-per-word layout vLLM reads). Zero points (asymmetric only)
are packed the same way along the output dimension.
"""

from __future__ import annotations

from typing import Any

import torch

from quantfarm.errors import BadRequest
from workers.engine.formats.base import FormatWriter
from workers.engine.methods.base import LayerwiseMethod
from workers.engine.model import StreamedModel
from workers.engine.pack import pack_bits

BITS = (4, 8)


def ct_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # the writer needs no compressed-tensors; the version is informational
        return None


def unquantized_linears(model: StreamedModel) -> list[str]:
    """Every ``nn.Linear`` outside the decoder layers' quantized linears (the output head, mostly)."""
    prefix = model.arch.layers + "."
    out = []
    for name, module in model.model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith(prefix):
            i, rel = name[len(prefix):].split(".", 1)
            if rel in model.arch.at(int(i)).linears:
                continue
        out.append(name)
    return out


def _linears_in(model: StreamedModel, method: LayerwiseMethod, names) -> list[str]:
    """The quantized linears whose packed tensors a layer's checkpoint holds (layers may differ)."""
    return [n for n in model.arch.linears if f"{n}.{method.packed_keys[0]}" in names]


class CompressedTensorsWriter(FormatWriter):
    """Repack a layer-wise method's integer codes as compressed-tensors ``pack-quantized``."""

    def check(self, method: LayerwiseMethod) -> None:
        bits = method.int_scheme()["bits"]
        if bits not in BITS:
            raise BadRequest(f"compressed-tensors takes {' or '.join(map(str, BITS))}-bit codes, not {bits}-bit.", code="unsupported_format")

    def _keys(self, method: LayerwiseMethod) -> list[str]:
        keys = ["weight_packed", "weight_scale", "weight_shape"]
        return keys + ([] if method.int_scheme()["sym"] else ["weight_zero_point"])

    def tensor_names(self, method: LayerwiseMethod, model: StreamedModel, names: list[str]) -> list[str]:
        linears = _linears_in(model, method, names)
        packed = {f"{n}.{k}" for n in linears for k in method.packed_keys}
        out = [n for n in names if n not in packed]
        return out + [f"{n}.{k}" for n in linears for k in self._keys(method)]

    def layer_tensors(self, method: LayerwiseMethod, model: StreamedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scheme = method.int_scheme()
        bits, offset = scheme["bits"], 1 << (scheme["bits"] - 1)
        out = dict(tensors)
        for name in _linears_in(model, method, tensors):
            res = method.unpack({k: out.pop(f"{name}.{k}") for k in method.packed_keys})
            rows, cols = res.codes.shape
            g = scheme["group_size"] if scheme["group_size"] > 0 else cols
            if not torch.equal(res.g_idx.long(), torch.arange(cols) // g):
                raise BadRequest("compressed-tensors needs groups of consecutive columns; act-order without static_groups "
                                 "permutes them.", code="unsupported_format")
            out[f"{name}.weight_packed"] = pack_bits(res.codes, bits, dim=1)
            # [rows, groups] in the model's dtype, as llm-compressor stores them (fp16-exact: float16/32 keep them exactly)
            out[f"{name}.weight_scale"] = res.scales.t().contiguous().to(model.source_dtype)
            out[f"{name}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
            if not scheme["sym"]:
                zeros = res.zeros.t().contiguous()  # stored value = signed zero point + offset = our zero
                out[f"{name}.weight_zero_point"] = pack_bits(zeros, bits, dim=0)
            elif not bool((res.zeros == offset).all()):
                raise BadRequest("symmetric codes must have their zero point at the middle.", code="unsupported_format")
        return out

    def quantization_config(self, method: LayerwiseMethod, model: StreamedModel) -> dict[str, Any]:
        s = method.int_scheme()
        weights = {
            "num_bits": s["bits"], "type": "int", "symmetric": s["sym"],
            "group_size": s["group_size"] if s["group_size"] > 0 else None,
            "strategy": "group" if s["group_size"] > 0 else "channel",
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {},
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
                "format": "pack-quantized",
            }},
            "ignore": unquantized_linears(model),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "version": ct_version(),
        }
