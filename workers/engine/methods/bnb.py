"""bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8()): quantized while transformers loads.

These methods are not layer-wise: there is no calibration and nothing to
checkpoint. Their ``quantize`` (``workers.engine.bnb``) loads the model through
``BitsAndBytesConfig`` and saves what ``save_pretrained`` writes.
"""

from __future__ import annotations

from typing import Any

from workers.engine.bnb import quantize_bnb
from workers.engine.methods.base import EngineJob, Method, Quantized


class BnBMethod(Method):
    """Shared by both bitsandbytes methods: build the ``BitsAndBytesConfig`` from the options."""

    format = "bitsandbytes"
    requires_calibration = False

    def quantize(self, job: EngineJob) -> Quantized:
        return quantize_bnb(self, job)

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
