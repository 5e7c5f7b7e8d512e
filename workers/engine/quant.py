"""The maths of weight quantization: pure functions on tensors.

Names follow the GPTQ paper and IST-DASLab's reference (``W``, ``H``).
Weights are ``[rows, cols]`` = ``[out_features, in_features]``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Scales are stored as fp16; keep them inside its range so the stored value is the used one.
_MIN_SCALE = 1e-6
# Inputs at least this wide accumulate H block-wise, using its symmetry (smaller ones gain nothing).
_SYMMETRIC_FROM = 512
# From this width the symmetric product uses 4 x 4 blocks (10 of 16 computed) instead of 2 x 2 (3 of 4):
# one 4096-token batch, 2 threads, width 5632: 0.86 s against 1.05 (6 or 11 blocks: 0.90-0.93, each
# product too small); width 2048: 0.132 against 0.145.
_SYMMETRIC_FOUR = 2048
# gptq_quantize solves at least this many rows per thread.
_PARALLEL_ROWS = 2048


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
        rows, cols = self.codes.shape
        groups = self.scales.shape[0]
        if cols % groups == 0 and torch.equal(g, torch.arange(cols, device=g.device) // (cols // groups)):
            # Groups of consecutive columns (static groups, or no act-order): broadcast, no gathers (0.19 s against
            # 0.30 at 11264 x 2048).
            codes = self.codes.reshape(rows, groups, cols // groups)
            w = self.scales.t().half()[:, :, None] * (codes - self.zeros.t()[:, :, None]).half()
            return w.float().reshape(rows, cols)
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
    X = X.reshape(-1, X.shape[-1])
    X = X if X.dtype in (torch.float32, torch.float64) else X.float()
    n = X.shape[0]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
    total = nsamples + n
    beta, alpha = nsamples / total, 2.0 / total
    cols = X.shape[1]
    if cols < _SYMMETRIC_FROM:
        H.addmm_(X.t(), X, beta=beta, alpha=alpha)  # no scaled copy of X
        return H, total
    # H is symmetric: compute the blocks on and above the diagonal (k(k+1)/2 of k² blocks: 5/8 of the
    # multiply-adds at k=4) and mirror the ones above (factor_hessian permutes, so both triangles are read).
    bounds = _symmetric_blocks(cols)
    for i, (a0, a1) in enumerate(bounds):
        A = X[:, a0:a1]
        for b0, b1 in bounds[i:]:
            H[a0:a1, b0:b1].addmm_(A.t(), X[:, b0:b1], beta=beta, alpha=alpha)
    for i, (a0, a1) in enumerate(bounds):
        for b0, b1 in bounds[i + 1:]:
            H[b0:b1, a0:a1] = H[a0:a1, b0:b1].t()
    return H, total


def _symmetric_blocks(cols: int) -> list[tuple[int, int]]:
    """Column ranges for the symmetric product."""
    k = 4 if cols >= _SYMMETRIC_FOUR else 2
    edges = [cols * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


class HessianSum:
    """A running ``H = 2/n * sum(x xᵀ)`` over every input row seen so far."""

    def __init__(self) -> None:
        self.H: torch.Tensor | None = None
        self.n = 0

    def add(self, X: torch.Tensor) -> None:
        self.H, self.n = accumulate_hessian(self.H, self.n, X)


@dataclass
class HessianFactor:
    """``H = V Vᵀ`` with ``V`` upper triangular: the damped Hessian (a dead input's diagonal set to 1), in
    act-order when asked. ``Vs`` is ``V`` with each column divided by its diagonal ``d`` (a unit diagonal).
    Modules sharing an input share one."""

    Vs: torch.Tensor
    d: torch.Tensor
    perm: torch.Tensor | None  # the act-order permutation, or None
    dead: torch.Tensor  # the inputs that are always 0

    @property
    def dtype(self) -> torch.dtype:
        return self.Vs.dtype


def factor_hessian(H: torch.Tensor, damp_percent: float, desc_act: bool) -> HessianFactor:
    """Dampen and factor a Hessian for the solver; the caller's ``H`` is left as it is.

    GPTQ's reference feeds each column's error forward with the upper Cholesky factor ``U`` of ``H⁻¹``.
    ``V = U⁻¹`` is upper too and ``H = V Vᵀ``, so the same sweep can read ``V`` instead (GPTQ as Babai's
    nearest plane, Chen et al. 2025): no inverse at all. With ``J`` the reversal, ``K`` the lower Cholesky
    factor of ``JHJ`` gives ``V = JKJ``: one Cholesky of the reversed (and act-order permuted) Hessian,
    gathered in one indexing; width 5632, 2 threads: 0.7 s against 1.4-1.8 for the factor of the inverse.
    """
    H = H.double() if H.dtype == torch.float64 else H.float()
    n = H.shape[0]
    diag = torch.diag(H)
    dead = diag == 0
    diag = torch.where(dead, torch.ones_like(diag), diag)
    perm = torch.argsort(diag, descending=True) if desc_act else None
    rev = perm.flip(0) if perm is not None else torch.arange(n - 1, -1, -1, device=H.device)
    Hr = H[rev[:, None], rev[None, :]]  # J H J (act-order permuted): a copy, so H stays as it was
    idx = torch.arange(n, device=H.device)
    Hr[idx, idx] = diag[rev] + damp_percent * torch.mean(diag)
    K = torch.linalg.cholesky(Hr)
    del Hr
    V = K.flip(0, 1)
    del K
    d = torch.diag(V).clone()
    return HessianFactor(V.div_(d), d, perm, dead)


def gptq_quantize(W: torch.Tensor, factor: HessianFactor, **kw) -> QuantResult:
    """``gptq_sweep`` on ``W``'s rows, in parts solved side by side on a CPU with threads to spare.

    Rows are independent, and each part's values are those of the whole solve (a test holds the parts
    against one call); the column loop is op-bound on one thread, so two parts on two threads
    take less time (11264 x 2048, 2 threads: 1.0-1.4 s against 1.6-1.7).
    """
    parts = min(torch.get_num_threads(), W.shape[0] // _PARALLEL_ROWS) if W.device.type == "cpu" else 1
    if parts < 2:
        return gptq_sweep(W, factor, **kw)
    edges = [W.shape[0] * i // parts for i in range(parts + 1)]
    with ThreadPoolExecutor(parts) as pool:
        res = list(pool.map(lambda a, b: gptq_sweep(W[a:b], factor, **kw), edges[:-1], edges[1:]))
    row_losses = torch.cat([r.row_losses for r in res])
    return QuantResult(
        torch.cat([r.codes for r in res]), torch.cat([r.scales for r in res], 1), torch.cat([r.zeros for r in res], 1),
        res[0].g_idx, float(row_losses.sum()), row_losses,
    )


def _column_params(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype, maxq: int):
    """A group's scale and the bounds of its codes minus the zero point, as the sweep reads them."""
    zero = zero.to(dtype)
    return scale.to(dtype), -zero, maxq - zero


def _gptq_state(W1: torch.Tensor, R1: torch.Tensor, Vs1: torch.Tensor) -> torch.Tensor:
    """A group's columns (rows of ``W1``, the sweep's transposed block) as GPTQ's reference holds them when the
    group starts, which is what its parameters are found from: with every earlier residual in, the sweep
    holds ``w + P / d`` (``P`` the sums over earlier residuals), the reference ``w + Uᵀ P`` over the group's
    own diagonal block (``U = V⁻¹``), which is ``w + Vs⁻ᵀ (W1 - w)``. ``R1``: the group's weights, not yet rounded."""
    return R1 + torch.linalg.solve_triangular(Vs1.t(), W1 - R1, upper=False, unitriangular=True)


def gptq_sweep(
    W: torch.Tensor,
    factor: HessianFactor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    static_groups: bool = False,
    blocksize: int = 128,
    min_zero: int = 0,
) -> QuantResult:
    """Quantize ``W [rows, cols]`` column by column with error feedback (GPTQ).

    ``factor`` comes from ``factor_hessian``. Rows are independent, so modules sharing an input can be
    solved in one call on their stacked rows. Column ``k`` is rounded from ``w_k + Σ_{j<k} r_j V[j,k] / V[k,k]``,
    ``r_j = w_j - q_j`` the residuals of the columns before it: the value GPTQ's reference rounds (its
    ``w_k - Σ_{j<k} e_j U[j,k]`` with ``E = R V``). Blocks of columns: a block's sums over the earlier blocks'
    residuals are one product, then its columns are swept one by one, each residual added to the block's
    later columns at once. The sweep works on ``Wᵀ`` so that each column it visits is contiguous.
    """
    Vs, d, perm, dead = factor.Vs, factor.d, factor.perm, factor.dead
    dtype = Vs.dtype
    W = W.to(dtype).clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    gs = cols if group_size == -1 else group_size
    if cols % gs or (group_size != -1 and blocksize % gs):
        raise ValueError(f"in_features {cols} / blocksize {blocksize} must be multiples of group_size {gs}")
    W[:, dead] = 0
    n_groups = cols // gs

    scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.int32, device=W.device)
    static = static_groups or group_size == -1
    if static:
        for g in range(n_groups):
            scales[g], zeros[g] = find_params(W[:, g * gs:(g + 1) * gs], bits, sym, min_zero=min_zero)
        params = [_column_params(scales[g], zeros[g], dtype, maxq) for g in range(n_groups)]  # once, not per column
    order = perm.tolist() if perm is not None else None
    WT = (W[:, perm] if perm is not None else W).t().contiguous()  # row j = column j of the (permuted) W
    del W
    codes = torch.zeros(cols, rows, dtype=dtype, device=WT.device)
    col_group = [0] * cols  # group of each permuted column
    losses = torch.zeros(rows, dtype=dtype, device=WT.device)
    scale = lo = hi = None

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2].clone()  # the block's columns as they will be rounded, once every earlier residual is in
        if i1:
            W1.addmm_(Vs[:i1, i1:i2].t(), WT[:i1])  # WT[:i1] holds the earlier columns' residuals by now
        R1 = WT[i1:i2]  # the block's weights, each replaced by its residual once rounded
        D1 = torch.empty_like(W1)  # the block's dequantized values
        Vs1 = Vs[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = (order[col] if order is not None else col) // gs if static else col // gs
            if static:
                scale, lo, hi = params[g]
            elif col % gs == 0:  # a group starts: its parameters see its columns as GPTQ has updated them
                scales[g], zeros[g] = find_params(_gptq_state(W1[i:i + gs], R1[i:i + gs], Vs1[i:i + gs, i:i + gs]).t(),
                                                  bits, sym, min_zero=min_zero)
                scale, lo, hi = _column_params(scales[g], zeros[g], dtype, maxq)
            col_group[col] = g
            q = codes[col]  # written in place: fewer tensors per column, the loop is op-bound
            torch.div(W1[i], scale, out=q).round_().clamp_(lo, hi)  # the code minus its zero point: 6 ops a column
            dq = torch.mul(q, scale, out=D1[i])
            W1[i + 1:].addr_(Vs1[i, i + 1:], R1[i].sub_(dq))
        losses += W1.sub_(D1).mul_(d[i1:i2, None]).square_().sum(0) / 2  # GPTQ's (w - q)² / U[k,k]², U[k,k] = 1 / d[k]

    col_group_t = torch.tensor(col_group, dtype=torch.int32, device=codes.device)
    codes += zeros.to(dtype)[col_group_t.long()]  # every column's zero point, at once
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[inv]
        col_group_t = col_group_t[inv]
    return QuantResult(codes.t().to(torch.int32).contiguous(), scales, zeros, col_group_t, float(losses.sum()), losses.float())
