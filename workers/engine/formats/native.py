"""The method's own format: the checkpointed tensors as they are (gptq, awq, bitsandbytes)."""

from __future__ import annotations

from workers.engine.formats.base import FormatWriter


class NativeWriter(FormatWriter):
    """Write what the method checkpointed, with the method's ``quantization_config``."""
