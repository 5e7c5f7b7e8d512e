"""bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8()): quantized while transformers loads.

These methods are not layer-wise: there is no calibration and nothing to
checkpoint, so the layer loop never runs them. ``workers.engine.bnb`` loads the
model through ``BitsAndBytesConfig`` and saves what ``save_pretrained`` writes.
The classes sit in the registry so the method list, dispatch and model card see
one interface.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantfarm.errors import BadRequest
from workers.engine.arch import Arch
from workers.engine.methods.base import LayerContext, LayerOutput, Method


class BnBMethod(Method):
    """Shared by both bitsandbytes methods: build the ``BitsAndBytesConfig`` from the options."""

    format = "bitsandbytes"
    requires_calibration = False
    required_packages = ("bitsandbytes",)
    layerwise = False

    def config_kwargs(self, default_skips: list[str] | None = None) -> dict[str, Any]:
        """Keyword arguments of ``BitsAndBytesConfig``.

        ``skip_modules`` adds to transformers' own skips (the output head, tied
        weights) instead of replacing them, so the head stays in full precision.
        """
        raise NotImplementedError

    def bnb_config(self, default_skips: list[str] | None = None):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**self.config_kwargs(default_skips))

    def quantization_config(self) -> dict[str, Any]:
        return self.bnb_config().to_dict()

    def _skips(self, default_skips: list[str] | None) -> list[str] | None:
        extra = list(self.options.skip_modules)
        if not extra:
            return None  # transformers picks its defaults at load and again at reload
        return sorted(set(default_skips or []) | set(extra))

    def quantize_layer(self, ctx: LayerContext) -> LayerOutput:
        raise BadRequest(f"{self.name} is not a layer-wise method; run it through workers.engine.bnb.quantize_bnb.")

    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        raise BadRequest(f"{self.name} writes no layer checkpoints to apply.")


class BnB4Method(BnBMethod):
    name = "bnb-4bit"

    def config_kwargs(self, default_skips: list[str] | None = None) -> dict[str, Any]:
        o = self.options
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": o.quant_type,
            "bnb_4bit_use_double_quant": o.double_quant,
            "bnb_4bit_compute_dtype": o.compute_dtype,
            "llm_int8_skip_modules": self._skips(default_skips),
        }


class BnB8Method(BnBMethod):
    name = "bnb-8bit"

    def config_kwargs(self, default_skips: list[str] | None = None) -> dict[str, Any]:
        o = self.options
        return {
            "load_in_8bit": True,
            "llm_int8_threshold": o.threshold,
            "llm_int8_skip_modules": self._skips(default_skips),
        }
