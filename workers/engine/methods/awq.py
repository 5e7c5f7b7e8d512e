"""AWQ (activation-aware weight quantization), as llm-awq and AutoAWQ do it.

Per decoder layer: gather the inputs of every group of linears that share one,
search per-input-channel scales ``s`` (grid over the exponent α) that minimise
the group's output error after quantization, fold ``1/s`` into the op that
produces the input (a norm, or the previous linear's output rows), search a
per-group clipping of the weights, then round group-wise with a zero point. Every 4th calibration window is held
out of the searches, and a group's scales (a linear's clip) are kept only where
they lower the output error on those windows: AWQ is never worse there than
plain rounding with the same groups and zero points.
The architecture table says which op feeds which group; nothing here looks at
class names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from workers.engine.arch import Arch, LinearGroup
from workers.engine.awq_pack import dequantize_awq, pack_awq, unpack_awq
from workers.engine.methods.base import LayerContext, LayerOutput, LayerwiseMethod, set_weight
from workers.engine.methods.awq_inputs import GroupInputs, _first, gather_inputs, gram_of, heldout_masks, linear_inspect  # noqa: F401
from workers.engine.quant import QuantResult

N_GRID = 20  # α in {0, 1/20, ..., 19/20}, as AutoAWQ
COARSE_STEP = 4  # search_grid scores every 4th α first, then the neighbours of the best
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # try max-value shrinks of 0 .. 45 %
_FP16_MAX = 65504.0
_PACKED = ("qweight", "qzeros", "scales")


# --- the maths: pure functions on tensors --------------------------------------


def _round_groups(Wg: torch.Tensor, zero_point: bool, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale (fp16-exact), zero and float codes for ``Wg [rows, groups, group_size]``."""
    if zero_point:
        maxq = 2**bits - 1
        wmax, wmin = Wg.amax(-1), Wg.amin(-1)
        scale = ((wmax - wmin).clamp(min=1e-5) / maxq).clamp(max=_FP16_MAX).half().float()
        zero = (-torch.round(wmin / scale)).clamp(0, maxq)
        codes = torch.clamp(torch.round(Wg / scale[..., None]) + zero[..., None], 0, maxq)
    else:
        half = 2 ** (bits - 1)
        scale = (Wg.abs().amax(-1).clamp(min=1e-5) / (half - 1)).clamp(max=_FP16_MAX).half().float()
        zero = torch.full_like(scale, half)
        codes = torch.clamp(torch.round(Wg / scale[..., None]), -half, half - 1) + half
    return scale, zero, codes


def awq_quantize(W: torch.Tensor, *, group_size: int, zero_point: bool, bits: int = 4) -> QuantResult:
    """Round ``W [rows, cols]`` group-wise along the input dimension, AutoAWQ style.

    Asymmetric: ``scale = (max - min) / 15``, ``zero = -round(min / scale)``;
    symmetric: ``scale = absmax / 7`` with the zero fixed at 8 (the AWQ kernels
    always read a zero point). Scales are rounded to fp16 first, so the codes are
    the best ones for the scale the kernel will use. Raises ValueError when
    ``group_size`` does not divide the columns.
    """
    rows, cols = W.shape
    if cols % group_size:
        raise ValueError(f"in_features {cols} is not a multiple of group_size {group_size}")
    scale, zero, codes = _round_groups(W.float().reshape(rows, cols // group_size, group_size), zero_point, bits)
    g_idx = (torch.arange(cols, device=W.device) // group_size).to(torch.int32)
    return QuantResult(
        codes.reshape(rows, cols).to(torch.int32), scale.t().contiguous(), zero.t().contiguous().to(torch.int32), g_idx
    )


def fake_quantize(W: torch.Tensor, *, group_size: int, zero_point: bool, bits: int = 4) -> torch.Tensor:
    """``W`` quantized and dequantized in float32 arithmetic, in ``W``'s dtype (for the searches)."""
    rows, cols = W.shape
    scale, zero, codes = _round_groups(W.float().reshape(rows, cols // group_size, group_size), zero_point, bits)
    return ((codes - zero[..., None]) * scale[..., None]).reshape(rows, cols).to(W.dtype)


def weight_magnitude(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of ``|w|`` normalised by its group's max: AutoAWQ's ``w_mean`` per input channel."""
    rows, cols = W.shape
    Wg = W.float().abs().reshape(-1, group_size)
    return (Wg / (Wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(rows, cols).mean(0)


def scales_for(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """Duo-scaled per-channel scales for exponent ``ratio``, normalised to geometric mean 1 of the extremes."""
    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def search_clip(W: torch.Tensor, x: torch.Tensor, *, group_size: int, zero_point: bool) -> torch.Tensor:
    """Return the per-(row, group) max value minimising the group-wise output error on ``x [tokens, cols]``."""
    rows, cols = W.shape
    ng = cols // group_size
    Wg = W.float().reshape(rows, ng, group_size)
    xg = x.float().reshape(-1, ng, group_size)
    ref = torch.einsum("rgk,tgk->rtg", Wg, xg)
    org_max = Wg.abs().amax(-1, keepdim=True)  # [rows, groups, 1]
    best_max = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        max_val = org_max * (1 - i / CLIP_GRID)
        cur = torch.clamp(Wg, -max_val, max_val).reshape(rows, cols)
        q = fake_quantize(cur, group_size=group_size, zero_point=zero_point).reshape(rows, ng, group_size)
        err = (torch.einsum("rgk,tgk->rtg", q, xg) - ref).pow(2).mean(1).unsqueeze(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def search_grid(score: Callable[[int], float], n: int = N_GRID, step: int = COARSE_STEP) -> int:
    """Return the index in ``range(n)`` with the lowest ``score`` among those scored (the first, on ties).

    Every ``step``-th index is scored, then the ones within ``step - 1`` of the best
    of those: 11 of AWQ's 20 α points instead of all (``step=1`` scores all). Where
    the score falls and then rises along the grid this is the full grid's answer.
    AWQ's output error after rounding is jagged, so it is not always: on the bench
    model's 16 groups it chose the full grid's α in 14, and in the other two an α
    whose error was within 2 % of the full grid's minimum, at equal perplexity
    (bench/RESULTS.md has both).
    """
    scores: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in scores:
            scores[i] = score(i)
        return scores[i]

    best = min(range(0, n, step), key=at)
    for i in range(max(0, best - step + 1), min(n, best + step)):
        at(i)
    return min(sorted(scores), key=scores.__getitem__)


def gram_error(delta: torch.Tensor, G: torch.Tensor) -> float:
    """``sum_t ||delta x_t||²`` for inputs with Gram matrix ``G = sum_t x_t x_tᵀ``: ``tr(delta G deltaᵀ)``.

    A linear's output error over the calibration tokens without running them: for
    ``delta = W_q - W [rows, cols]`` it costs rows x cols² instead of tokens x rows x cols.
    """
    d = delta.float()
    return float(((d @ G) * d).sum())


def apply_clip(W: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    rows, cols = W.shape
    Wg = W.reshape(rows, max_val.shape[1], -1)
    return torch.clamp(Wg, -max_val.to(W.dtype), max_val.to(W.dtype)).reshape(rows, cols)


# --- one layer ------------------------------------------------------------------


def foldable(layer: nn.Module, group: LinearGroup) -> bool:
    """Whether ``group.prev`` can absorb ``1/s``: its output channels must be the group's inputs.

    With grouped-query attention v_proj has fewer outputs than o_proj has inputs,
    so the v->o fold is skipped, as AutoAWQ does.
    """
    if group.prev is None:
        return False
    prev = layer.get_submodule(group.prev)
    weight = getattr(prev, "weight", None)
    return weight is not None and weight.shape[0] == layer.get_submodule(group.names[0]).weight.shape[1]


def fold_scales(layer: nn.Module, group: LinearGroup, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide ``prev``'s output channels (weight rows, bias) by ``s``; multiply the group's input columns by ``s``.

    A norm computing ``x * (offset + weight)`` gets ``(offset + weight) / s - offset``.
    """
    prev = layer.get_submodule(group.prev)
    w = prev.weight.data
    scale = s.view(-1, *[1] * (w.dim() - 1)).to(w.dtype)
    prev.weight.data = (w + offset) / scale - offset if offset else w / scale
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = prev.bias.data / s.to(prev.bias.dtype)
    for name in group.names:
        lin = layer.get_submodule(name)
        lin.weight.data = lin.weight.data * s.view(1, -1).to(lin.weight.dtype)


class AWQMethod(LayerwiseMethod):
    """AWQ into the ``quant_method: awq`` format (GEMM or GEMV packing)."""

    name = "awq"
    format = "awq"
    next_from_source = True
    packed_keys = _PACKED

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantResult:
        return unpack_awq(tensors, self.options.group_size, self.options.version)

    def int_scheme(self) -> dict:
        o = self.options
        return {"bits": o.bits, "group_size": o.group_size, "sym": not o.zero_point}

    def _fake(self, W: torch.Tensor) -> torch.Tensor:
        return fake_quantize(W, group_size=self.options.group_size, zero_point=self.options.zero_point)

    @torch.no_grad()
    def search_scale(self, layer: nn.Module, group: LinearGroup, rec: GroupInputs) -> torch.Tensor:
        """Grid-search α; return the scales whose quantized group reproduces the inspected output best.

        The error is the squared output error of the inspected module over every
        calibration token, as AutoAWQ measures it. Where that module is the
        group's own linear, the same sum comes from the inputs' Gram matrix
        (``gram_error``) instead of a forward per α.
        """
        linears = [layer.get_submodule(n) for n in group.names]
        originals = [lin.weight.data for lin in linears]
        w_mean = weight_magnitude(torch.cat(originals), self.options.group_size)
        x_mean = rec.x_mean().to(w_mean.device)
        if linear_inspect(group):
            G = rec.gram()

            def error(quantized: list[torch.Tensor]) -> float:
                return sum(gram_error(Wq - W, G) for Wq, W in zip(quantized, originals))
        else:
            inspect = layer.get_submodule(group.inspect)

            def error(quantized: list[torch.Tensor]) -> float:
                for lin, Wq in zip(linears, quantized):
                    lin.weight.data = Wq
                return sum(float(rec.rows(i, _first(inspect(*a, **k)).float() - r.float()).pow(2).sum())
                           for i, a, k, r in rec.recorded())  # read again for every α: batch by batch

        def score(i: int) -> float:
            s = scales_for(x_mean, w_mean, i / N_GRID)
            quantized = []
            for W in originals:
                sv = s.view(1, -1).to(W.dtype)
                quantized.append(self._fake(W * sv) / sv)
            return error(quantized)

        try:
            best = search_grid(score, step=1 if self.options.alpha_search == "full" else COARSE_STEP)
        finally:
            for lin, W in zip(linears, originals):
                lin.weight.data = W
        return scales_for(x_mean, w_mean, best / N_GRID)

    def quantize_layer(self, ctx: LayerContext) -> LayerOutput:
        """Search and fold scales, clip, round; return packed linears plus the norms and biases AWQ owns.

        Scales and clips are searched on the calibration windows that are not held
        out, and each is kept only where it lowers the linears' output error on the
        held-out windows; otherwise the group is rounded unscaled, the linear unclipped.
        """
        o, layer, arch = self.options, ctx.layer, ctx.arch
        rec, float_outputs = gather_inputs(ctx)
        # Every group's scales are searched on the float layer, then all are folded (AutoAWQ's order).
        scales, held = {}, {}
        for g in arch.groups:
            r = rec[g.names[0]]
            held[g.names[0]] = r.gram(heldout=True) if r.x else None  # an expert the router sent nothing
            if r.x and foldable(layer, g):
                s = self.search_scale(layer, g, r)
                if self.scales_help(layer, g, s, held[g.names[0]]):
                    scales[g.names[0]] = s
        samples = {}
        for g in arch.groups:
            x = rec[g.names[0]].sample() if rec[g.names[0]].x else None
            if g.names[0] in scales:
                s = scales[g.names[0]]
                fold_scales(layer, g, s, arch.norm_offset if g.prev not in arch.linears else 0.0)
                x = x / s.view(1, -1).to(x.dtype)
                sf = s.float().to(held[g.names[0]].device)
                held[g.names[0]] = held[g.names[0]] / sf.view(-1, 1) / sf.view(1, -1)  # the folded inputs' Gram
            samples[g.names[0]] = x
        for r in rec.values():
            r.release()
        del rec
        out = LayerOutput({}, next_inputs=float_outputs)
        for g in arch.groups:
            x, G = samples[g.names[0]], held.pop(g.names[0])
            for name in g.names:
                lin = layer.get_submodule(name)
                W = lin.weight.data
                if name not in arch.awq_no_clip:
                    W = self.clip_if_it_helps(W, x, G) if x is not None else W
                res = awq_quantize(W, group_size=o.group_size, zero_point=o.zero_point, bits=o.bits)
                for k, v in pack_awq(res, o.group_size, o.version).items():
                    out.tensors[f"{name}.{k}"] = v.cpu()
                if x is not None:
                    err = x.float() @ (res.dequantize() - lin.weight.data.float()).t()
                    out.losses[name] = float(err.pow(2).mean())
        out.tensors.update(self._owned_tensors(ctx))
        return out

    @torch.no_grad()
    def scales_help(self, layer: nn.Module, group: LinearGroup, s: torch.Tensor, G: torch.Tensor) -> bool:
        """Whether rounding the group scaled by ``s`` beats rounding it unscaled, on inputs with Gram ``G``."""
        scaled = plain = 0.0
        for name in group.names:
            W = layer.get_submodule(name).weight.data
            sv = s.view(1, -1).to(W.dtype)
            scaled += gram_error(self._fake(W * sv) / sv - W, G)
            plain += gram_error(self._fake(W) - W, G)
        return scaled < plain

    @torch.no_grad()
    def clip_if_it_helps(self, W: torch.Tensor, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """``W`` clipped as searched on the sample ``x``, if that lowers the rounding error on Gram ``G``."""
        o = self.options
        clipped = apply_clip(W, search_clip(W, x, group_size=o.group_size, zero_point=o.zero_point))
        if gram_error(self._fake(clipped) - W, G) < gram_error(self._fake(W) - W, G):
            return clipped
        return W

    def _owned_tensors(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        """The non-packed tensors AWQ writes: the folded norms, and every quantized linear's bias."""
        layer, source = ctx.layer, ctx.model.source_dtype
        out = {}
        for name in self._norms(ctx.arch):
            for pname, p in layer.get_submodule(name).named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p.data.to(source).cpu()
        for name in ctx.arch.linears:
            bias = layer.get_submodule(name).bias
            if bias is not None:  # the AWQ kernels keep the bias in fp16
                out[f"{name}.bias"] = bias.data.half().cpu()
        return out

    @staticmethod
    def _norms(arch: Arch) -> list[str]:
        return [g.prev for g in arch.groups if g.prev is not None and g.prev not in arch.linears]

    def apply(self, arch: Arch, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Set every tensor the checkpoint holds: dequantized linears, folded norms, fp16 biases."""
        o = self.options
        for name in arch.linears:
            t = {k: tensors[f"{name}.{k}"] for k in _PACKED}
            set_weight(layer, name, dequantize_awq(t, o.group_size, o.version))
        for key, value in tensors.items():
            module, _, pname = key.rpartition(".")
            if pname not in _PACKED:
                p = getattr(layer.get_submodule(module), pname)
                p.data = value.to(device=p.device, dtype=p.dtype)

    def replaced_weights(self, arch: Arch) -> set[str]:
        """The linears' weights and biases and the folded norms: the checkpoint holds them all."""
        owned = list(arch.linears) + self._norms(arch)
        return {f"{n}.{p}" for n in owned for p in ("weight", "bias")}

    def quantization_config(self) -> dict:
        o = self.options
        return {
            "quant_method": "awq",
            "bits": o.bits,
            "group_size": o.group_size,
            "zero_point": o.zero_point,
            "version": o.version,
            "modules_to_not_convert": None,
        }
