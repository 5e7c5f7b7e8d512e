"""FP8 W8A8: per-channel float8_e4m3 weights, dynamic per-token activations, in compressed-tensors.

What H100 fleets serve (llm-compressor's ``FP8_DYNAMIC`` scheme): each output
row of a linear gets one scale ``absmax / 448`` and its weights are rounded to
the nearest e4m3 value; activations are scaled per token at run time, so no
calibration is needed. The checkpoint is the ``float-quantized`` layout itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.engine.arch import Arch
from workers.engine.formats.compressed import ct_version, unquantized_linears
from workers.engine.methods.base import LayerContext, LayerOutput, LayerwiseMethod, set_weight
from workers.engine.model import StreamedModel

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def fp8_quantize(W: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (e4m3 weights, per-row scales ``[rows, 1]`` in ``scale_dtype``) for ``W [rows, cols]``."""
    W = W.float()
    scale = (W.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = (W / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight a kernel multiplies with: ``e4m3 * scale``."""
    return q.float() * scale.float()


class FP8Method(LayerwiseMethod):
    name = "fp8"
    format = "compressed-tensors"
    requires_calibration = False
    packed_keys = ("weight", "weight_scale")

    def quantize_layer(self, ctx: LayerContext) -> LayerOutput:
        out = LayerOutput({})
        for name in ctx.arch.linears:
            W = ctx.layer.get_submodule(name).weight.data
            q, scale = fp8_quantize(W, ctx.model.source_dtype)
            out.tensors[f"{name}.weight"] = q.cpu()
            out.tensors[f"{name}.weight_scale"] = scale.cpu()
            out.losses[name] = float((fp8_dequantize(q, scale) - W.float()).pow(2).mean())
        return out

    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name in arch.linears:
            set_weight(layer, name, fp8_dequantize(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]))

    def unpack(self, tensors):
        raise NotImplementedError("fp8 codes are floats; they are written only as compressed-tensors float-quantized")

    def int_scheme(self) -> dict[str, Any]:
        raise NotImplementedError("fp8 has no integer codes")

    def quantization_config(self) -> dict[str, Any]:
        return self.output_config(None)

    def output_config(self, model: StreamedModel | None) -> dict[str, Any]:
        def args(strategy: str, dynamic: bool) -> dict[str, Any]:
            return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": strategy,
                    "dynamic": dynamic, "actorder": None, "block_structure": None, "observer": None if dynamic else "minmax",
                    "observer_kwargs": {}}

        return {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": args("channel", False), "input_activations": args("token", True),
                "output_activations": None, "format": "float-quantized",
            }},
            "ignore": unquantized_linears(model) if model is not None else ["lm_head"],
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "version": ct_version(),
        }
