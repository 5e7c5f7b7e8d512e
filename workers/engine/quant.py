"""The maths of weight quantization: pure functions on tensors.

Names follow the GPTQ paper and IST-DASLab's reference (``W``, ``H``, ``Hinv``).
Weights are ``[rows, cols]`` = ``[out_features, in_features]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Scales are stored as fp16; keep them inside its range so the stored value is the used one.
_MIN_SCALE = 1e-6


@dataclass
class QuantResult:
    """Integer codes with their per-group parameters, in original column order.

    ``W_hat[r, c] = scales[g_idx[c], r] * (codes[r, c] - zeros[g_idx[c], r])``
    """

    codes: torch.Tensor  # int32 [rows, cols]
    scales: torch.Tensor  # float32 [groups, rows], exactly representable in fp16
    zeros: torch.Tensor  # int32 [groups, rows]
    g_idx: torch.Tensor  # int32 [cols]
    loss: float = 0.0
    row_losses: torch.Tensor | None = None  # GPTQ's per-row objective, to split stacked solves

    def dequantize(self) -> torch.Tensor:
        """The weight as kernels compute it: an fp16 product of scale and code offset."""
        g = self.g_idx.long()
        return (self.scales.half()[g].t() * (self.codes - self.zeros[g].t()).half()).float()


def find_params(W: torch.Tensor, bits: int, sym: bool, *, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-row ``scale`` (fp16-exact) and integer ``zero`` for a block of columns."""
    maxq = 2**bits - 1
    W = W.double() if W.dtype == torch.float64 else W.float()  # a float64 solve stays float64
    xmin = W.amin(dim=1).clamp(max=0)
    xmax = W.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).half().to(W.dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero.to(torch.int32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``w`` (any shape ending in rows... broadcast with scale) to integer codes."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn_quantize(W: torch.Tensor, *, bits: int, group_size: int, sym: bool, min_zero: int = 0) -> QuantResult:
    """Round-to-nearest, group-wise along the input dimension."""
    rows, cols = W.shape
    gs = cols if group_size == -1 else group_size
    if cols % gs:
        raise ValueError(f"in_features {cols} is not a multiple of group_size {gs}")
    maxq = 2**bits - 1
    Wg = W.float().reshape(rows, cols // gs, gs).transpose(0, 1)  # [groups, rows, gs]
    scales, zeros = [], []
    codes = torch.empty(cols // gs, rows, gs)
    for g in range(cols // gs):
        s, z = find_params(Wg[g], bits, sym, min_zero=min_zero)
        codes[g] = quantize_codes(Wg[g], s[:, None], z[:, None].float(), maxq)
        scales.append(s)
        zeros.append(z)
    codes = codes.transpose(0, 1).reshape(rows, cols).to(torch.int32)
    res = QuantResult(codes, torch.stack(scales), torch.stack(zeros), (torch.arange(cols) // gs).to(torch.int32))
    res.loss = float(((res.dequantize() - W.float()) ** 2).sum())
    return res


def accumulate_hessian(H: torch.Tensor | None, nsamples: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs ``X [..., cols]`` into ``H = 2/n * sum(x xᵀ)``; return (H, n)."""
    X = X.reshape(-1, X.shape[-1]).float()
    n = X.shape[0]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
    total = nsamples + n
    H.mul_(nsamples / total)
    X = X * math.sqrt(2.0 / total)
    H.addmm_(X.t(), X)
    return H, total


def prepare_hinv(H: torch.Tensor, damp_percent: float, desc_act: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Dampen and invert a Hessian for the solver.

    Returns ``(Hinv, perm, dead)``: the upper Cholesky factor of H⁻¹ (permuted by
    act-order when asked), the permutation (or None), and the mask of dead input
    columns. Modules sharing an input share this result.
    """
    H = H.clone().double() if H.dtype == torch.float64 else H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    damp = damp_percent * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    return Hinv, perm, dead


def gptq_quantize(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    perm: torch.Tensor | None,
    dead: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    static_groups: bool = False,
    blocksize: int = 128,
    min_zero: int = 0,
) -> QuantResult:
    """Quantize ``W [rows, cols]`` column by column with error feedback (GPTQ).

    ``Hinv``/``perm``/``dead`` come from ``prepare_hinv``. Rows are independent,
    so modules sharing an input can be solved in one call on their stacked rows.
    """
    dtype = Hinv.dtype
    W = W.to(dtype).clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    gs = cols if group_size == -1 else group_size
    if cols % gs or (group_size != -1 and blocksize % gs):
        raise ValueError(f"in_features {cols} / blocksize {blocksize} must be multiples of group_size {gs}")
    W[:, dead] = 0
    n_groups = cols // gs

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups or group_size == -1:
        static = [find_params(W[:, g * gs:(g + 1) * gs], bits, sym, min_zero=min_zero) for g in range(n_groups)]
    if perm is not None:
        W = W[:, perm]

    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.int32, device=W.device)
    col_group = torch.zeros(cols, dtype=torch.int32, device=W.device)  # group of each permuted column
    losses = torch.zeros(rows, dtype=dtype, device=W.device)
    scale = zero = None

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                orig = int(perm[col]) if perm is not None else col
                g = orig // gs
                scale, zero = static[g]
            else:
                g = col // gs
                if col % gs == 0:  # a group starts: its parameters see the error-updated weights
                    scale, zero = find_params(W1[:, i:i + gs], bits, sym, min_zero=min_zero)
                    scales[g], zeros[g] = scale, zero
            col_group[col] = g
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_codes(w, scale.to(dtype), zero.to(dtype), maxq)
            codes[:, col] = q.to(torch.int32)
            wq = scale.to(dtype) * (q - zero.to(dtype))
            losses += (w - wq) ** 2 / d**2 / 2
            err = (w - wq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static:
        for g, (s, z) in enumerate(static):
            scales[g], zeros[g] = s, z
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        col_group = col_group[inv]
    return QuantResult(codes, scales, zeros, col_group, float(losses.sum()), losses.float())
