"""Round-to-nearest: GPTQ's format without error feedback (no calibration)."""

from __future__ import annotations

from workers.engine.methods.base import LayerContext, LayerOutput
from workers.engine.methods.gptq import GPTQFormat
from workers.engine.quant import rtn_quantize


class RTNMethod(GPTQFormat):
    name = "rtn"
    requires_calibration = False

    def quantize_layer(self, ctx: LayerContext) -> LayerOutput:
        o = self.options
        out = LayerOutput({})
        for name in ctx.arch.linears:
            W = ctx.layer.get_submodule(name).weight.data
            res = rtn_quantize(W, bits=o.bits, group_size=o.group_size, sym=o.sym, min_zero=0 if o.sym else 1)
            self._store(out, name, res)
        return out

    def quantization_config(self) -> dict:
        cfg = super().quantization_config()
        cfg.update(desc_act=False, static_groups=False, damp_percent=0.01, true_sequential=True)
        return cfg
