"""AWQ packing against AutoAWQ's packing loops, rewritten here from their definition.

AutoAWQ's ``WQLinear_GEMM.from_linear`` takes ``intweight [in, out]`` and, for each
word ``col`` of a row, ORs column ``col*8 + order_map[i]`` in at bit ``4*i`` with
``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros [in/g, out]`` the same way;
``scales [in/g, out]`` fp16. ``WQLinear_GEMV.from_linear`` packs ``intweight
[out, in]`` along ``in`` in natural order, and pads zeros/scales ``[out, groups]``
to ``calculate_zeros_width`` words.
"""

from __future__ import annotations

import pytest
import torch

from workers.engine.awq_pack import (
    dequantize_awq,
    gemv_zeros_width,
    pack_gemm,
    pack_gemv,
    unpack_gemm,
    unpack_gemv,
)
from workers.engine.methods.awq import awq_quantize, fake_quantize
from workers.engine.quant import QuantResult

MASK = (1 << 32) - 1


def _signed(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def autoawq_pack_rows(intweight: list[list[int]], order_map: list[int]) -> torch.Tensor:
    """AutoAWQ's loop: every row's columns packed eight to a word in ``order_map`` order."""
    out = []
    for row in intweight:
        words = []
        for col in range(len(row) // 8):
            w = 0
            for i in range(8):
                w |= row[col * 8 + order_map[i]] << (i * 4)
            words.append(_signed(w & MASK))
        out.append(words)
    return torch.tensor(out, dtype=torch.int32)


def autoawq_zeros_width(in_features: int, group_size: int) -> int:
    multiplier = {128: 1, 64: 2, 32: 4}[group_size]
    base = (in_features // group_size + 7) // 8
    return (base + multiplier - 1) // multiplier * multiplier


def random_result(rows: int, cols: int, group_size: int, seed: int = 0) -> QuantResult:
    g = torch.Generator().manual_seed(seed)
    groups = cols // group_size
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (groups, rows), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, rows, generator=g) * 0.05 + 1e-3).half().float()
    return QuantResult(codes, scales, zeros, (torch.arange(cols) // group_size).to(torch.int32))


GEMM_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("rows,cols,group_size", [(64, 128, 32), (256, 128, 128), (24, 256, 64)])
def test_gemm_packing_equals_autoawq_definition(rows, cols, group_size):
    res = random_result(rows, cols, group_size)
    t = pack_gemm(res, group_size)
    assert t["qweight"].shape == (cols, rows // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (cols // group_size, rows // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (cols // group_size, rows) and t["scales"].dtype == torch.float16
    assert torch.equal(t["qweight"], autoawq_pack_rows(res.codes.t().tolist(), GEMM_ORDER))
    assert torch.equal(t["qzeros"], autoawq_pack_rows(res.zeros.tolist(), GEMM_ORDER))
    assert torch.equal(t["scales"], res.scales.half())


@pytest.mark.parametrize("rows,cols,group_size", [(64, 128, 32), (64, 256, 64), (16, 2048, 128)])
def test_gemv_packing_equals_autoawq_definition(rows, cols, group_size):
    res = random_result(rows, cols, group_size, seed=3)
    t = pack_gemv(res, group_size)
    width = autoawq_zeros_width(cols, group_size)
    assert gemv_zeros_width(cols, group_size) == width
    assert t["qweight"].shape == (rows, cols // 8)
    assert torch.equal(t["qweight"], autoawq_pack_rows(res.codes.tolist(), list(range(8))))
    zeros = torch.zeros(rows, width * 8, dtype=torch.int32)
    zeros[:, : cols // group_size] = res.zeros.t()
    assert torch.equal(t["qzeros"], autoawq_pack_rows(zeros.tolist(), list(range(8))))
    scales = torch.zeros(rows, width * 8, dtype=torch.float16)
    scales[:, : cols // group_size] = res.scales.t().half()
    assert torch.equal(t["scales"], scales)


@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_pack_unpack_round_trip(version):
    res = random_result(128, 256, 64, seed=5)
    pack, unpack = (pack_gemm, unpack_gemm) if version == "gemm" else (pack_gemv, unpack_gemv)
    back = unpack(pack(res, 64), 64)
    assert torch.equal(back.codes, res.codes)
    assert torch.equal(back.zeros, res.zeros)
    assert torch.equal(back.scales, res.scales)
    assert torch.equal(back.g_idx, res.g_idx)


def test_gemm_and_gemv_dequantize_to_the_same_weight():
    res = random_result(64, 256, 64, seed=7)
    assert torch.equal(dequantize_awq(pack_gemm(res, 64), 64, "gemm"), dequantize_awq(pack_gemv(res, 64), 64, "gemv"))


def test_dequantize_matches_gptqmodel_awq_kernel_code():
    """The loader's own unpack + reverse-order + fp16 product gives our weight, bit for bit."""
    packing = pytest.importorskip("gptqmodel.quantization.awq.utils.packing_utils")
    res = random_result(128, 256, 128, seed=11)
    t = pack_gemm(res, 128)
    theirs = packing.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, 128)  # [in, out] fp16
    assert theirs.dtype == torch.float16
    assert torch.equal(theirs.float().t(), dequantize_awq(t, 128, "gemm"))


def test_pack_rejects_codes_out_of_range():
    res = random_result(8, 64, 32)
    res.codes[0, 0] = 16
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_gemm(res, 32)


def reference_pseudo_quantize(W: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """AutoAWQ's ``pseudo_quantize_tensor`` in float64, with the scale rounded to fp16 as stored."""
    w = W.double().reshape(-1, group_size)
    if zero_point:
        mx, mn = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
        s = ((mx - mn).clamp(min=1e-5) / 15).half().double()
        z = (-torch.round(mn / s)).clamp(0, 15)
        q = (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s
    else:
        s = (w.abs().amax(1, keepdim=True).clamp(min=1e-5) / 7).half().double()
        q = torch.clamp(torch.round(w / s), -8, 7) * s
    return q.reshape(W.shape)


@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_quantize_matches_autoawq_pseudo_quantize(zero_point):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    res = awq_quantize(W, group_size=64, zero_point=zero_point)
    ref = reference_pseudo_quantize(W, 64, zero_point)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 15
    if not zero_point:
        assert bool((res.zeros == 8).all())
    # The stored weight is an fp16 product: equal to the float64 reference up to fp16 rounding.
    assert torch.allclose(res.dequantize().double(), ref, rtol=2**-10, atol=0)
    assert torch.allclose(fake_quantize(W, group_size=64, zero_point=zero_point).double(), ref, rtol=1e-6, atol=1e-9)
    # No weight is clipped here: each lands within one step of itself (half a step of
    # rounding, plus up to half a step from rounding the zero point).
    step = res.scales.t().repeat_interleave(64, dim=1)
    assert bool(((res.dequantize() - W).abs() <= step + 1e-6).all())


def test_awq_quantize_rejects_group_size_not_dividing_columns():
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        awq_quantize(torch.zeros(8, 192), group_size=128, zero_point=True)
