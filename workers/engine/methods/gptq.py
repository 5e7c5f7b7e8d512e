"""GPTQ, as in the paper and IST-DASLab's reference, with shared Hessians."""

from __future__ import annotations

import torch
from torch import nn

from workers.engine import ENGINE_VERSION
from workers.engine.arch import Arch, LinearGroup
from workers.engine.methods.base import LayerContext, LayerOutput, Method, set_weight
from workers.engine.model import StreamedModel
from workers.engine.pack import dequantize_gptq, pack_gptq
from workers.engine.quant import QuantResult, accumulate_hessian, gptq_quantize, prepare_hinv

_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class GPTQFormat(Method):
    """Writing and applying the ``quant_method: gptq`` (v1) tensors."""

    format = "gptq"

    def _store(self, out: LayerOutput, name: str, res: QuantResult) -> None:
        for k, v in pack_gptq(res, self.options.bits).items():
            out.tensors[f"{name}.{k}"] = v.cpu()
        out.losses[name] = res.loss

    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name in arch.linears:
            t = {k: tensors[f"{name}.{k}"] for k in _KEYS}
            set_weight(layer, name, dequantize_gptq(t, self.options.bits))
            bias = layer.get_submodule(name).bias
            if bias is not None:  # GPTQ kernels hold the bias in fp16
                bias.data = bias.data.half().to(bias.dtype)

    def quantization_config(self) -> dict:
        o = self.options
        return {
            "quant_method": "gptq",
            "bits": o.bits,
            "group_size": o.group_size,
            "sym": o.sym,
            "checkpoint_format": "gptq",
            "meta": {"quantizer": [f"quantfarm:{ENGINE_VERSION}"], "method": self.name},
        }


def split_rows(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """Cut a result solved on stacked weights back into one result per module."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        part = QuantResult(res.codes[sl], res.scales[:, sl], res.zeros[:, sl], res.g_idx)
        if res.row_losses is not None:
            part.row_losses = res.row_losses[sl]
            part.loss = float(part.row_losses.sum())
        out.append(part)
        start += n
    return out


class GPTQMethod(GPTQFormat):
    name = "gptq"

    def _hessians(self, model: StreamedModel, layer: nn.Module, inputs, groups: list[LinearGroup]) -> dict[str, tuple[torch.Tensor, int]]:
        """One forward pass; one Hessian per group of linears that share an input."""
        acc: dict[str, list] = {g.names[0]: [None, 0] for g in groups}
        handles = []
        for key in acc:
            def hook(_m, args, _out, key=key):
                acc[key][0], acc[key][1] = accumulate_hessian(acc[key][0], acc[key][1], args[0])

            handles.append(layer.get_submodule(key).register_forward_hook(hook))
        try:
            model.forward_layer(layer, inputs)
        finally:
            for h in handles:
                h.remove()
        return {k: (v[0], v[1]) for k, v in acc.items()}

    def solve_group(self, layer: nn.Module, group: LinearGroup, H: torch.Tensor) -> list[tuple[str, QuantResult]]:
        """Quantize every linear of a group against their shared Hessian in one solve."""
        o = self.options
        Hinv, perm, dead = prepare_hinv(H, o.damp_percent, o.desc_act)
        weights = [layer.get_submodule(n).weight.data for n in group.names]
        W = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
        res = gptq_quantize(
            W, Hinv, perm, dead, bits=o.bits, group_size=o.group_size, sym=o.sym,
            static_groups=o.static_groups, min_zero=0 if o.sym else 1,
        )
        parts = split_rows(res, [w.shape[0] for w in weights])
        return list(zip(group.names, parts))

    def quantize_layer(self, ctx: LayerContext) -> LayerOutput:
        groups = list(ctx.arch.groups)
        stages = [[g] for g in groups] if self.options.true_sequential else [groups]
        out = LayerOutput({})
        for stage in stages:
            hessians = self._hessians(ctx.model, ctx.layer, ctx.inputs, stage)
            for group in stage:
                H, _n = hessians[group.names[0]]
                for name, res in self.solve_group(ctx.layer, group, H):
                    self._store(out, name, res)
                    if self.options.true_sequential:  # later groups see this group's quantized outputs
                        set_weight(ctx.layer, name, res.dequantize())
        return out

    def quantization_config(self) -> dict:
        o = self.options
        cfg = super().quantization_config()
        cfg.update(desc_act=o.desc_act, static_groups=o.static_groups, damp_percent=o.damp_percent, true_sequential=o.true_sequential)
        return cfg
