"""The quantization maths against a straightforward float64 GPTQ written here from the paper.

The reference keeps the full inverse Hessian and removes each quantized column with
the explicit OBS update ``Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]`` and updates every
remaining weight at once (no Cholesky, no lazy blocks). Our solver reads the upper
triangular ``V`` with ``H = V Vᵀ`` (no inverse) in 128-column blocks; in float64 both must
pick the same codes.

Scale/zero conventions (fp16-exact scales, sym zero at the middle, asym zero clamped to
``[min_zero, maxq]``) are the checkpoint format's, so the reference states them too.
"""

from __future__ import annotations

import pytest
import torch

from workers.engine.quant import (
    QuantResult,
    accumulate_hessian,
    factor_hessian,
    find_params,
    gptq_quantize,
    rtn_quantize,
)

ROWS, COLS = 16, 256  # two lazy blocks of 128 columns
DAMP = 0.01


# --- the reference -----------------------------------------------------------------


def ref_params(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of a block of float64 columns, by the format's definition."""
    maxq = 2**bits - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-6).half().double()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def reference_gptq(W, H, *, bits, group_size, sym, desc_act=False, static_groups=False, min_zero=0, damp=DAMP):
    """GPTQ column by column in float64; returns codes, scales, zeros, g_idx, Q and the OBS loss."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    gs = cols if group_size == -1 else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = None
    if static_groups or group_size == -1:  # parameters from the weights before any update
        static = [ref_params(W[:, g * gs:(g + 1) * gs], bits, sym, min_zero) for g in range(cols // gs)]
    order = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(cols)
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)

    codes = torch.zeros(rows, cols, dtype=torch.int64)
    Q = torch.zeros(rows, cols, dtype=torch.float64)
    g_idx = torch.zeros(cols, dtype=torch.int64)
    scales = torch.zeros(cols // gs, rows, dtype=torch.float64)
    zeros = torch.zeros(cols // gs, rows, dtype=torch.float64)
    loss = 0.0
    for pos in range(cols):
        q = int(order[pos])
        if static is not None:
            g = q // gs
            s, z = static[g]
        else:
            g = pos // gs
            if pos % gs == 0:  # the group's parameters see every earlier column's error
                s, z = ref_params(W[:, order[pos:pos + gs]], bits, sym, min_zero)
        scales[g], zeros[g] = s, z
        c = torch.clamp(torch.round(W[:, q] / s) + z, 0, maxq)
        wq = s * (c - z)
        d = Hinv[q, q]
        err = (W[:, q] - wq) / d
        loss += float(((W[:, q] - wq) ** 2 / d).sum() / 2)
        W -= torch.outer(err, Hinv[q, :])  # OBS: move every remaining weight to compensate
        Hinv -= torch.outer(Hinv[:, q], Hinv[q, :]) / d  # and remove column q from the inverse
        codes[:, q], Q[:, q], g_idx[q] = c.long(), wq, g
    return {"codes": codes, "scales": scales, "zeros": zeros.long(), "g_idx": g_idx, "Q": Q, "loss": loss}


# --- data --------------------------------------------------------------------------


def make_problem(seed: int = 0, dead: tuple[int, ...] = (), rows: int = ROWS, cols: int = COLS):
    """A weight and a correlated, unevenly scaled Hessian ``2/n XᵀX`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    W[:, 5] *= 6.0  # an outlier column
    mix = torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    col_scale = torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    X = (torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) @ mix) * col_scale
    X[:, list(dead)] = 0.0
    H = 2.0 / X.shape[0] * X.t() @ X
    return W, H, X


def ours(W, H, *, bits, group_size, sym, desc_act=False, static_groups=False, min_zero=0, dtype=torch.float64) -> QuantResult:
    return gptq_quantize(W.to(dtype), factor_hessian(H.to(dtype), DAMP, desc_act), bits=bits, group_size=group_size, sym=sym,
                         static_groups=static_groups, min_zero=min_zero)


def assert_same_as_reference(res: QuantResult, ref: dict) -> None:
    assert torch.equal(res.codes.long(), ref["codes"]), f"{int((res.codes.long() != ref['codes']).sum())} codes differ"
    assert torch.equal(res.scales.double(), ref["scales"])
    assert torch.equal(res.zeros.long(), ref["zeros"])
    assert torch.equal(res.g_idx.long(), ref["g_idx"])
    # The kernel multiplies an fp16 scale by the code offset in fp16.
    assert torch.equal(res.dequantize().double(), ref["Q"].half().double())
    assert res.loss == pytest.approx(ref["loss"], rel=1e-9)


def proxy_error(W, Q, H) -> float:
    """The layer-wise objective ``tr((W-Q) H (W-Q)ᵀ)`` = ``||WX - QX||² · 2/n``."""
    E = W.double() - Q.double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


# --- GPTQ ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_float64_equals_reference(bits, group_size, sym):
    W, H, _ = make_problem(bits * 100 + group_size)
    min_zero = 0 if sym else 1  # what the gptq method passes: GPTQ v1 stores zero - 1
    kw = dict(bits=bits, group_size=group_size, sym=sym, min_zero=min_zero)
    res = ours(W, H, **kw)
    assert res.codes.min() >= 0 and res.codes.max() <= 2**bits - 1
    assert_same_as_reference(res, reference_gptq(W, H, **kw))


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (2, True), (8, False)])
def test_gptq_act_order_equals_reference(bits, sym, group_size, static_groups):
    W, H, _ = make_problem(7 + bits, dead=(3, 130))
    kw = dict(bits=bits, group_size=group_size, sym=sym, desc_act=True, static_groups=static_groups, min_zero=0 if sym else 1)
    res = ours(W, H, **kw)
    ref = reference_gptq(W, H, **kw)
    assert_same_as_reference(res, ref)
    gs = COLS if group_size == -1 else group_size
    if static_groups or group_size == -1:
        # Static groups keep the natural column grouping: g_idx is just column // group_size.
        assert torch.equal(res.g_idx.long(), torch.arange(COLS) // gs)
    else:
        # Act-order groups follow the permutation: columns quantized together share a group.
        diag = torch.diag(H).clone()
        diag[diag == 0] = 1.0  # dead columns, as factor_hessian treats them
        perm = torch.argsort(diag, descending=True)
        assert torch.equal(res.g_idx.long()[perm], torch.arange(COLS) // gs)
        assert not torch.equal(res.g_idx.long(), torch.arange(COLS) // gs)


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_static_groups_without_act_order(desc_act):
    W, H, _ = make_problem(3)
    kw = dict(bits=4, group_size=64, sym=False, desc_act=desc_act, static_groups=True, min_zero=1)
    assert_same_as_reference(ours(W, H, **kw), reference_gptq(W, H, **kw))


@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_columns_quantize_to_zero(desc_act):
    """A zero Hessian diagonal (an input that is always 0) gives a zero weight, not a NaN."""
    dead = (0, 31, 200)
    W, H, _ = make_problem(11, dead=dead)
    kw = dict(bits=4, group_size=32, sym=True, desc_act=desc_act)
    res = ours(W, H, **kw)
    assert_same_as_reference(res, reference_gptq(W, H, **kw))
    Q = res.dequantize()
    assert torch.isfinite(Q).all()
    assert torch.equal(Q[:, list(dead)], torch.zeros(ROWS, len(dead)))


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 128, True, False), (4, 32, False, True), (3, 64, True, True), (2, -1, False, False), (8, 32, True, False)])
def test_gptq_float32_agrees_with_float64_reference(bits, group_size, sym, desc_act):
    W, H, _ = make_problem(21 + bits)
    kw = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, min_zero=0 if sym else 1)
    res = ours(W, H, dtype=torch.float32, **kw)
    ref = reference_gptq(W, H, **kw)
    same = float((res.codes.long() == ref["codes"]).double().mean())
    assert same >= 0.99, f"only {same:.2%} of codes agree"
    assert torch.equal(res.g_idx.long(), ref["g_idx"])
    assert res.loss == pytest.approx(ref["loss"], rel=0.01)
    assert proxy_error(W, res.dequantize(), H) == pytest.approx(proxy_error(W, ref["Q"], H), rel=0.01)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (3, 64), (2, -1)])
def test_gptq_beats_rtn_on_its_objective(bits, group_size):
    """Error feedback lowers ``||WX - QX||²`` compared with rounding each weight alone."""
    W, H, _ = make_problem(5)
    g = ours(W, H, bits=bits, group_size=group_size, sym=True, desc_act=True, dtype=torch.float32)
    r = rtn_quantize(W.float(), bits=bits, group_size=group_size, sym=True)
    assert proxy_error(W, g.dequantize(), H) < 0.8 * proxy_error(W, r.dequantize(), H)


def test_gptq_solves_stacked_rows_like_separate_ones():
    """Rows are independent: q/k/v solved in one call equal three separate solves."""
    W, H, _ = make_problem(9, rows=24)
    kw = dict(bits=4, group_size=32, sym=True, desc_act=True)
    whole = ours(W, H, **kw)
    for sl in (slice(0, 8), slice(8, 16), slice(16, 24)):
        part = ours(W[sl], H, **kw)
        assert torch.equal(part.codes, whole.codes[sl])
        assert torch.equal(part.scales, whole.scales[:, sl])
        assert torch.equal(part.zeros, whole.zeros[:, sl])


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_parts_on_threads_equal_one_sweep(monkeypatch, desc_act):
    """gptq_quantize splits the rows over threads: the parts put together are the whole sweep, bit for bit
    (the reported losses to float32 rounding: a column sum's vectorization follows the row count)."""
    import workers.engine.quant as quant

    W, H, _ = make_problem(13, rows=24)
    factor = factor_hessian(H.float(), DAMP, desc_act)
    kw = dict(bits=3, group_size=32, sym=False, static_groups=desc_act, min_zero=1)
    whole = quant.gptq_sweep(W.float(), factor, **kw)
    monkeypatch.setattr(quant, "_PARALLEL_ROWS", 8)
    monkeypatch.setattr(quant.torch, "get_num_threads", lambda: 3)
    calls = []
    sweep = quant.gptq_sweep
    monkeypatch.setattr(quant, "gptq_sweep", lambda W, *a, **k: calls.append(W.shape[0]) or sweep(W, *a, **k))
    parts = quant.gptq_quantize(W.float(), factor, **kw)
    assert calls == [8, 8, 8]
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(parts, field), getattr(whole, field)), field
    torch.testing.assert_close(parts.row_losses, whole.row_losses, rtol=1e-5, atol=0)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-5)


@pytest.mark.parametrize("desc_act", [False, True])
def test_factor_hessian_is_the_upper_factor_of_the_damped_hessian(desc_act):
    """V Vᵀ = H (dead columns set to 1, damped, act-order permuted), V upper triangular; the caller's H is untouched."""
    _W, H, _X = make_problem(seed=3, dead=(7, 100))
    before = H.clone()
    f = factor_hessian(H, DAMP, desc_act)
    assert torch.equal(H, before)
    assert f.dead.nonzero().flatten().tolist() == [7, 100]
    Hd = H.clone()
    Hd[f.dead, f.dead] = 1.0
    if desc_act:
        assert torch.equal(f.perm, torch.argsort(torch.diag(Hd), descending=True))
        Hd = Hd[f.perm][:, f.perm]
    else:
        assert f.perm is None
    Hd += DAMP * torch.mean(torch.diag(Hd)) * torch.eye(COLS, dtype=torch.float64)
    V = f.Vs * f.d
    assert torch.equal(f.Vs, torch.triu(f.Vs)) and torch.equal(torch.diag(f.Vs), torch.ones(COLS, dtype=torch.float64))
    assert bool((f.d > 0).all())
    torch.testing.assert_close(V @ V.t(), Hd, rtol=1e-12, atol=1e-12)
    # V is the inverse of the reference's factor U (UᵀU = H⁻¹): the same sweep, read from either
    U = torch.linalg.inv(V)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-9, atol=1e-12)


def test_gptq_rejects_group_size_that_does_not_divide():
    W, H, _ = make_problem(0, cols=96, rows=4)
    with pytest.raises(ValueError, match="multiples of group_size 64"):
        gptq_quantize(W, factor_hessian(H, DAMP, False), bits=4, group_size=64, sym=True)


# --- Hessian, RTN, find_params ----------------------------------------------------


@pytest.mark.parametrize("cols", [64, 768, 2048])  # 768: 2 x 2 symmetric blocks, 2048: 4 x 4
def test_accumulate_hessian_equals_two_over_n_xtx(cols):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, n, cols, generator=g) * 3 for n in (5, 17, 40)]  # [batch, seq, features]
    H, n = None, 0
    for X in batches:
        H, n = accumulate_hessian(H, n, X)
    X = torch.cat([b.reshape(-1, cols) for b in batches]).double()
    assert n == X.shape[0] == 124
    expected = 2.0 / n * X.t() @ X
    assert H.dtype == torch.float32
    torch.testing.assert_close(H.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [64, 768])
def test_bf16_inputs_are_multiplied_in_float32(cols):
    """bf16 products rounded to bf16 per batch made a tiny model's Hessian indefinite (bench/RESULTS.md, realistic_width)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, n, cols, generator=g) * 3 + 1).bfloat16() for n in (5, 17, 40)]
    H, n, H32, n32 = None, 0, None, 0
    for X in batches:
        H, n = accumulate_hessian(H, n, X)
        H32, n32 = accumulate_hessian(H32, n32, X.float())
    assert H.dtype == torch.float32 and n == n32 and torch.equal(H, H32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_equals_direct_rounding(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(8, 256, generator=g) * torch.linspace(0.1, 4, 256)
    res = rtn_quantize(W, bits=bits, group_size=group_size, sym=sym)
    gs = 256 if group_size == -1 else group_size
    maxq = 2**bits - 1
    for k in range(256 // gs):
        cols = slice(k * gs, (k + 1) * gs)
        s, z = ref_params(W[:, cols].double(), bits, sym)
        codes = torch.clamp(torch.round(W[:, cols].double() / s[:, None]) + z[:, None], 0, maxq)
        assert torch.equal(res.codes[:, cols].long(), codes.long())
        assert torch.equal(res.scales[k].double(), s)
        assert torch.equal(res.zeros[k].long(), z.long())
    assert torch.equal(res.g_idx.long(), torch.arange(256) // gs)
    direct = res.dequantize().double() - W.double()
    assert res.loss == pytest.approx(float((direct**2).sum()), rel=1e-5)
    # Rounding to nearest: no weight inside the grid moves by more than half a step
    # (plus the fp16 rounding of the kernel's scale * offset product).
    step = res.scales[res.g_idx.long()].t().double()
    inside = (res.codes > 0) & (res.codes < maxq)
    slack = res.dequantize().double().abs() * 2.0**-11
    assert (direct.abs() <= step / 2 + slack)[inside].all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_find_params_all_zero_rows(bits, sym):
    """An all-zero row gets a finite scale and a zero point that maps 0 back to exactly 0."""
    W = torch.zeros(3, 32)
    W[1] = torch.linspace(-1, 2, 32)
    scale, _ = find_params(W, bits, sym)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(scale, scale.half().float())  # stored as fp16 exactly
    res = rtn_quantize(W, bits=bits, group_size=32, sym=sym)
    assert torch.equal(res.dequantize()[[0, 2]], torch.zeros(2, 32))
    assert torch.equal(res.codes[0], res.zeros[0, 0].expand(32))


def test_find_params_one_signed_rows():
    """All-positive rows put the zero at the bottom (asym) or the middle (sym)."""
    W = torch.tensor([[0.5, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, -0.5]])
    s, z = find_params(W, 4, sym=False)
    assert z.tolist() == [0, 15]
    assert torch.allclose(s, torch.tensor([3.0 / 15, 3.0 / 15]), rtol=1e-3)
    _, z1 = find_params(W, 4, sym=False, min_zero=1)  # GPTQ v1 cannot store zero 0
    assert z1.tolist() == [1, 15]
    ss, zs = find_params(W, 4, sym=True)
    assert zs.tolist() == [8, 8]
    # As in IST-DASLab's reference: under sym a row with no negative weight keeps xmin = 0.
    assert torch.allclose(ss, torch.tensor([3.0 / 15, 6.0 / 15]), rtol=1e-3)


def test_find_params_tiny_values_keep_a_representable_scale():
    W = torch.full((2, 8), 1e-9)
    scale, _ = find_params(W, 4, sym=True)
    assert (scale >= 1e-6).all() and torch.equal(scale, scale.half().float())


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_is_the_fp16_product_of_scale_and_code_offset(act_order):
    """Consecutive groups (broadcast) and act-order groups (gathered) alike: each weight is its group's fp16 scale times
    its code minus the zero point, rounded once to fp16 (the product of two fp16 values, as the kernel computes it)."""
    g = torch.Generator().manual_seed(4)
    rows, cols, gs = 6, 64, 16
    g_idx = torch.arange(cols) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(cols, generator=g)]
    res = QuantResult(torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32),
                      (torch.rand(cols // gs, rows, generator=g) * 3).half().float(),
                      torch.randint(1, 16, (cols // gs, rows), generator=g, dtype=torch.int32), g_idx.to(torch.int32))
    exact = res.scales.double()[g_idx].t() * (res.codes - res.zeros[g_idx].t()).double()
    assert torch.equal(res.dequantize(), exact.half().float())
