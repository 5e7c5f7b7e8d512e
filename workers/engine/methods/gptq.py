"""GPTQ, as in the paper and IST-DASLab's reference, with shared Hessians."""

from __future__ import annotations

import logging
from itertools import groupby

import torch
from torch import nn

from workers.engine import ENGINE_VERSION
from workers.engine.activations import Activations
from workers.engine.arch import Arch, LinearGroup
from workers.engine.methods.base import LayerContext, LayerOutput, LayerwiseMethod, set_weight
from workers.engine.moe import calibrating, routed_counts
from workers.engine.walk import LayerWalk, replace_first
from workers.engine.pack import dequantize_gptq, pack_gptq, unpack_gptq
from workers.engine.quant import HessianSum, QuantResult, factor_hessian, gptq_quantize, rtn_quantize

log = logging.getLogger(__name__)

_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class GPTQFormat(LayerwiseMethod):
    """Writing and applying the ``quant_method: gptq`` (v1) tensors."""

    format = "gptq"
    packed_keys = _KEYS

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantResult:
        return unpack_gptq(tensors, self.options.bits)

    def _store(self, out: LayerOutput, name: str, res: QuantResult) -> None:
        for k, v in pack_gptq(res, self.options.bits).items():
            out.tensors[f"{name}.{k}"] = v.cpu()
        out.losses[name] = res.loss

    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name in arch.linears:
            t = {k: tensors[f"{name}.{k}"] for k in _KEYS}
            set_quantized(layer, name, dequantize_gptq(t, self.options.bits))

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


def set_quantized(layer: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Make a linear compute as a GPTQ kernel does: dequantized weight, bias held in fp16."""
    set_weight(layer, name, weight)
    bias = layer.get_submodule(name).bias
    if bias is not None:
        bias.data = bias.data.half().to(bias.dtype)


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


STORED_INPUTS_MAX_BYTES = 256 * 1024**2  # quantfarm/memory.py restates it for the admission estimate


def stored_input_bytes(walk: LayerWalk, linear: nn.Module) -> int:
    """What keeping ``linear``'s input for every calibration batch would take."""
    tokens = sum(hidden.shape[:-1].numel() for hidden, _ in walk.inputs)
    return tokens * linear.in_features * (walk.inputs[0][0].element_size() if walk.inputs else 0)


class GPTQMethod(GPTQFormat):
    name = "gptq"

    def solve_group(self, layer: nn.Module, group: LinearGroup, H: torch.Tensor) -> list[tuple[str, QuantResult]]:
        """Quantize every linear of a group against their shared Hessian in one solve."""
        o = self.options
        factor = factor_hessian(H, o.damp_percent, o.desc_act)
        weights = [layer.get_submodule(n).weight.data for n in group.names]
        W = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
        res = gptq_quantize(
            W, factor, bits=o.bits, group_size=o.group_size, sym=o.sym,
            static_groups=o.static_groups, min_zero=0 if o.sym else 1,
        )
        parts = split_rows(res, [w.shape[0] for w in weights])
        return list(zip(group.names, parts))

    def solve_or_round(self, layer: nn.Module, group: LinearGroup, h: HessianSum, routed: dict, out: LayerOutput):
        """``solve_group``, or round to nearest an expert that saw too few tokens for a Hessian."""
        o = self.options
        tokens = routed.get(group.stage, [])[group.expert] if group.expert is not None and group.stage in routed else None
        starved = h.H is None or (o.moe_calibration == "routed" and tokens is not None and tokens < o.min_expert_tokens)
        if not starved:
            return self.solve_group(layer, group, h.H)
        log.warning("%s: %s routed tokens (< min_expert_tokens %d); rounding to nearest", group.names[0], tokens, o.min_expert_tokens)
        out.stats.setdefault("rtn_experts", []).extend(group.names)
        return [(n, rtn_quantize(layer.get_submodule(n).weight.data, bits=o.bits, group_size=o.group_size, sym=o.sym,
                                 min_zero=0 if o.sym else 1)) for n in group.names]

    def quantize_layer(self, ctx: LayerContext) -> LayerOutput:
        if self.options.true_sequential:
            return self._sequential(ctx)
        # One pass with the source weights feeds every group's Hessian.
        acc = {g.names[0]: HessianSum() for g in ctx.arch.groups}
        hooks = [ctx.layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, h=h: h.add(a[0])) for n, h in acc.items()]
        try:
            with calibrating(ctx.layer, self.options.moe_calibration == "all_experts"), torch.no_grad():
                for hidden, kwargs in ctx.inputs:  # the outputs are not needed: none is kept
                    ctx.layer(hidden, **kwargs)
                routed = routed_counts(ctx.layer)
        finally:
            for hook in hooks:
                hook.remove()
        out = LayerOutput({})
        if routed:
            out.stats["expert_tokens"] = routed
        for group in ctx.arch.groups:
            for name, res in self.solve_or_round(ctx.layer, group, acc[group.names[0]], routed, out):
                self._store(out, name, res)
        return out

    @torch.no_grad()
    def _sequential(self, ctx: LayerContext) -> LayerOutput:
        """Group by group: each sees the quantized outputs of the groups before it.

        After the last layer nothing reads the layer's outputs: its last group's output and the final pass
        are not computed (the down projection's forward, a sixth of a Llama layer's)."""
        out = LayerOutput({})
        walk = LayerWalk(ctx.layer, ctx.inputs)
        last = ctx.arch.groups[-1]
        for (stage, _step), run in groupby(ctx.arch.groups, key=lambda g: (g.stage, g.step)):
            if stage is not None:
                self._stage(ctx, walk, list(run), out)
                continue
            for group in run:
                self._one_group(ctx, walk, group, out, outputs=ctx.wants_next or group is not last)
        if ctx.wants_next:
            out.next_inputs = walk.finish()
        else:
            walk.release()
        return out

    def _one_group(self, ctx: LayerContext, walk: LayerWalk, group: LinearGroup, out: LayerOutput, outputs: bool = True) -> None:
        """Quantize one group on the inputs it sees now; with ``outputs``, keep the output of the sub-module it closes."""
        first, h = group.names[0], HessianSum()
        linear = ctx.layer.get_submodule(first)
        stored = Activations(walk.inputs.spool)  # kept as the calibration activations are: in RAM or spilled
        # The sub-module's output is computed from the linear's inputs once it is quantized: kept from this
        # pass, or (when all of them would take more than STORED_INPUTS_MAX_BYTES) computed again by a second
        # pass, which costs the sub-module's forward up to the linear but holds one batch instead of them all.
        keep = outputs and group.closes is not None and stored_input_bytes(walk, linear) <= STORED_INPUTS_MAX_BYTES

        def on_input(x):
            h.add(x)
            if keep:
                stored.append(x)

        # The norm that feeds the group (not a linear: one of those is quantized later) is computed once.
        norm = group.prev if group.prev is not None and group.prev not in ctx.arch.linears and group.prev not in walk.memo else None
        returned = walk.watch(first, on_input, until_output_of=group.closes if outputs else None, keep_output_of=norm)
        for name, res in self.solve_group(ctx.layer, group, h.H):
            self._store(out, name, res)
            set_quantized(ctx.layer, name, res.dequantize())
        h.H = None  # solved: free it before the outputs below are computed
        if group.closes is None or not outputs:
            return
        memo = Activations(walk.inputs.spool)
        if keep:
            for r, x in zip(returned, stored.drain()):  # each stored input is dropped once its output exists
                memo.append(replace_first(r, linear(x)))
        else:  # the same modules on the same inputs: the same values as stored ones (forward: not the hook again)
            walk.watch(first, lambda x: memo.append(replace_first(returned[len(memo)], linear.forward(x))))
        walk.memo[group.closes] = memo

    def _stage(self, ctx: LayerContext, walk: LayerWalk, run: list[LinearGroup], out: LayerOutput) -> None:
        """A sparse block's experts: one pass gathers every expert's Hessian, then each is solved."""
        sums = {g.names[0]: HessianSum() for g in run}
        with calibrating(ctx.layer, self.options.moe_calibration == "all_experts"):
            walk.collect({n: h.add for n, h in sums.items()}, stop_after=run[0].stage)
            routed = routed_counts(ctx.layer)
        if run[0].step == 0:
            out.stats.setdefault("expert_tokens", {}).update(routed)
        for group in run:
            for name, res in self.solve_or_round(ctx.layer, group, sums[group.names[0]], routed, out):
                self._store(out, name, res)
                set_quantized(ctx.layer, name, res.dequantize())

    def quantization_config(self) -> dict:
        o = self.options
        cfg = super().quantization_config()
        cfg.update(desc_act=o.desc_act, static_groups=o.static_groups, damp_percent=o.damp_percent, true_sequential=o.true_sequential)
        return cfg
