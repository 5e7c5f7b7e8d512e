"""llama.cpp's k-quants Q4_K and Q6_K, vectorized over blocks with numpy.

A super-block is 256 consecutive weights of a row (``QK_K``):

* **Q4_K**: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min under one
  fp16 ``d`` and one fp16 ``dmin``; weight = ``d*sc*q - dmin*m`` with ``q`` in 0..15
  (144 bytes per super-block, 4.5 bits per weight).
* **Q6_K**: 16 sub-blocks of 16, each with an int8 scale under one fp16 ``d``;
  weight = ``d*sc*(q - 32)`` with ``q`` in 0..63 (210 bytes, 6.5625 bits per weight).

The searches follow ggml's reference quantizers (``quantize_row_q4_K_ref`` with
``make_qkx2_quants``; ``quantize_row_q6_K_ref`` with ``make_qx_quants``) and, with an
importance matrix, their weighted versions (``quantize_row_q4_K_impl`` with
``make_qkx3_quants`` and ``make_qp_quants``; ``quantize_row_q6_K_impl``): the same
candidate scales and error measures, evaluated for every block at once instead of one
block at a time. Float sums may round differently from ggml's sequential loops, so a
code can differ from llama-quantize's where two candidates tie within rounding; the
layout is ggml's exactly. Each function returns the packed blocks and the weights they
decode to (computed as ggml and the ``gguf`` package decode them).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_EPS = 1e-15  # ggml's GROUP_MAX_EPS
_CHUNK = 1 << 20  # weights per slice: bounds the temporaries of a large tensor


def _rint(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even."""
    return np.rint(v)


def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2/3_quants over rows of ``x [n, 32]``: (scale, -min, codes) minimizing the ``w``-weighted squared error."""
    mn = np.minimum(x.min(axis=1), 0.0)
    mx = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    flat = mx <= mn
    rng = np.where(flat, 1.0, mx - mn).astype(np.float32)
    iscale = np.float32(nmax) / rng
    scale = 1.0 / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * np.square(scale[:, None] * L + mn[:, None] - x)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            isc = np.float32(rmin + rdelta * step + nmax) / (mx - mn)
            v = isc[:, None] * (x - mn[:, None])
            La = np.where(v > 0, _rint(np.minimum(v, nmax)), 0.0).astype(np.float32)
            sum_l = (w * La).sum(axis=1)
            sum_l2 = (w * La * La).sum(axis=1)
            sum_xl = (w * La * x).sum(axis=1)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, 0.0, this_min).astype(np.float32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(np.float32)
            err = (w * np.square(this_scale[:, None] * La + this_min[:, None] - x)).sum(axis=1)
            better = (D > 0) & (err < best) & ~flat
            L = np.where(better[:, None], La, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, 0.0, scale).astype(np.float32)
    L = np.where(flat[:, None], 0.0, L)
    return scale, (-mn).astype(np.float32), L.astype(np.float32)


def _qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants over rows of non-negative ``x [n, k]``: (scale, codes 0..nmax) for the ``w``-weighted error."""
    mx = np.maximum(x.max(axis=1), 0.0)
    zero = mx < _EPS
    safe = np.where(zero, 1.0, mx).astype(np.float32)
    iscale = np.float32(nmax) / safe
    L = np.clip(_rint(iscale[:, None] * x), 0, nmax)
    best = (w * np.square(x - (1.0 / iscale)[:, None] * L)).sum(axis=1)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = np.float32(0.1 * step + nmax) / safe
        l = np.clip(_rint(isc[:, None] * x), 0, nmax)
        mse = (w * np.square(x - (1.0 / isc)[:, None] * l)).sum(axis=1)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, isc, iscale)
    L = np.clip(_rint(iscale[:, None] * x), 0, nmax)
    sumlx = (w * x * L).sum(axis=1)
    suml2 = (w * L * L).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(5):  # coordinate descent, one code at a time as ggml does
            changed = np.zeros(len(x), dtype=bool)
            for i in range(x.shape[1]):
                wi, xi, li = w[:, i], x[:, i], L[:, i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                ok = (slx > 0) & (sl2 > 0)
                new = np.minimum(nmax, _rint(xi * sl2 / np.where(ok, slx, 1.0)))
                slx2 = slx + wi * xi * new
                sl22 = sl2 + wi * new * new
                take = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed |= take
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, 0.0)
    return np.where(zero, 0.0, scale).astype(np.float32), np.where(zero[:, None], 0.0, L).astype(np.uint8)


def _pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """ggml's 12-byte layout of eight 6-bit scales and mins per super-block."""
    out = np.zeros((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _q4_k_blocks(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    nb = len(x)
    sub = x.reshape(nb * 8, 32)
    if qw is None:  # quantize_row_q4_K_ref
        av = np.sqrt(np.square(sub).sum(axis=1) / 32)
        w = av[:, None] + np.abs(sub)
        scales, mins, L = _qkx(sub, w, 15, -1.0, 0.1, 20)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(axis=1), 0.0)
        max_min = np.maximum(mins.max(axis=1), 0.0)
        inv_s = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0).astype(np.float32)
        inv_m = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0).astype(np.float32)
        ls = np.clip(_rint(inv_s[:, None] * scales), 0, 63).astype(np.uint8)
        lm = np.clip(_rint(inv_m[:, None] * mins), 0, 63).astype(np.uint8)
        d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    else:  # quantize_row_q4_K_impl
        sigma2 = 2 * np.square(x).sum(axis=1) / QK_K
        w = (qw.reshape(nb, QK_K) * np.sqrt(sigma2[:, None] + np.square(x))).reshape(nb * 8, 32)
        scales, mins, L = _qkx(sub, w, 15, -0.9, 0.05, 36)
        sw = w.sum(axis=1).reshape(nb, 8)
        d_block, ls = _qp(scales.reshape(nb, 8), 63, sw)
        m_block, lm = _qp(mins.reshape(nb, 8), 63, sw)
        d, dmin = _fp16(d_block), _fp16(m_block)
    dl = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # [nb, 8], as ggml decodes them
    ml = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    L = L.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((x.reshape(nb, 8, 32) + ml[..., None]) / dl[..., None]), 0, 15)
    L = np.where((dl != 0)[..., None], requant, L).astype(np.uint8).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    packed = np.concatenate([d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8),
                             _pack_q4_k_scales(ls, lm), qs], axis=1)
    deq = (dl[..., None] * L.reshape(nb, 8, 32).astype(np.float32) - ml[..., None]).reshape(nb, QK_K)
    return packed, deq


def _qx(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants (rmse_type 1) over rows of ``x [n, 16]``: (signed scale, codes 0..2*nmax-1)."""
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(len(x)), idx]
    zero = np.abs(mx) < _EPS
    safe = np.where(zero, 1.0, mx).astype(np.float32)
    w = np.square(x) if qw is None else qw
    iscale = -np.float32(nmax) / safe
    l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
    sumlx = (w * x * l).sum(axis=1)
    suml2 = (w * l * l).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, 0.0).astype(np.float32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = -np.float32(nmax + 0.1 * step) / safe
            la = np.clip(_rint(isc[:, None] * x), -nmax, nmax - 1)
            slx = (w * x * la).sum(axis=1)
            sl2 = (w * la * la).sum(axis=1)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            l = np.where(better[:, None], la, l)
            scale = np.where(better, slx / np.where(better, sl2, 1), scale).astype(np.float32)
            best = np.where(better, scale * slx, best)
    return np.where(zero, 0.0, scale).astype(np.float32), np.where(zero[:, None], 0.0, l + nmax)


def _q6_k_blocks(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    nb = len(x)
    sub = x.reshape(nb * 16, 16)
    scales, L = _qx(sub, 32, None if qw is None else qw.reshape(nb * 16, 16))
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    zero = np.abs(max_scale) < _EPS
    iscale = np.float32(-128.0) / np.where(zero, 1.0, max_scale).astype(np.float32)
    d = _fp16(np.where(zero, 0.0, 1.0 / iscale))
    sc = np.where(zero[:, None], 0, np.minimum(127, _rint(iscale[:, None] * scales))).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(x.reshape(nb, 16, 16) / dl[..., None]), -32, 31) + 32
    L = np.where((dl != 0)[..., None], requant, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, 32]
    ql = np.stack([L[:, :, 0] & 0xF | (L[:, :, 2] & 0xF) << 4, L[:, :, 1] & 0xF | (L[:, :, 3] & 0xF) << 4], axis=2)
    qh = L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    packed = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1)
    deq = (dl.reshape(nb, 16, 1) * (L.reshape(nb, 16, 16).astype(np.float32) - 32)).reshape(nb, QK_K)
    return packed, deq


def _quantize(blocks_fn, nbytes: int, data: np.ndarray, imatrix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = data.shape
    if cols % QK_K:
        raise ValueError(f"k-quants need rows of a multiple of {QK_K} weights, not {cols}")
    if imatrix is not None and imatrix.shape != (cols,):
        raise ValueError(f"the importance matrix has {imatrix.shape} entries for rows of {cols}")
    x = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, QK_K)
    qw = None if imatrix is None else np.asarray(imatrix, dtype=np.float32)
    per_row = cols // QK_K
    step = max(1, _CHUNK // cols) * per_row  # whole rows per slice, so the imatrix lines up
    packed, deq = [], []
    for s in range(0, len(x), step):
        p, d = blocks_fn(x[s:s + step], None if qw is None else np.tile(qw, min(step, len(x) - s) // per_row))
        packed.append(p)
        deq.append(d)
    return np.concatenate(packed).reshape(rows, per_row * nbytes), np.concatenate(deq).reshape(rows, cols)


def quantize_q4_k(data: np.ndarray, imatrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K blocks of a 2-D float array (rows of a multiple of 256) and the weights they decode to."""
    return _quantize(_q4_k_blocks, Q4_K_BYTES, data, imatrix)


def quantize_q6_k(data: np.ndarray, imatrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks of a 2-D float array (rows of a multiple of 256) and the weights they decode to."""
    return _quantize(_q6_k_blocks, Q6_K_BYTES, data, imatrix)
