"""Bit packing against AutoGPTQ's packing loops, rewritten here from their definition.

AutoGPTQ's ``QuantLinear.pack`` fills uint32 words along the input dimension of
``intweight [in, out]``: for 2/4/8 bits word ``r`` holds values ``r*32/bits + j`` at bit
``bits*j``; for 3 bits three words hold 32 values, two of which straddle a word
boundary. ``qzeros [groups, out]`` is packed the same way along the output dimension.
"""

from __future__ import annotations

import pytest
import torch

from workers.engine.pack import (
    dequantize_gptq,
    pack_bits,
    pack_gptq,
    unpack_bits,
    unpack_gptq,
)
from workers.engine.quant import QuantResult, rtn_quantize

MASK = (1 << 32) - 1


def _signed(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def autogptq_pack_column(values: list[int], bits: int) -> list[int]:
    """AutoGPTQ's loop for one column of ``intweight`` (values along the packed dim)."""
    words: list[int] = []
    i = 0
    n_words = len(values) * bits // 32
    while len(words) < n_words:
        if bits in (2, 4, 8):
            w = 0
            for j in range(i, i + 32 // bits):
                w |= values[j] << (bits * (j - i))
            i += 32 // bits
            words.append(w & MASK)
        else:  # bits == 3
            w0 = 0
            for j in range(i, i + 10):
                w0 |= values[j] << (3 * (j - i))
            i += 10
            w0 |= values[i] << 30
            w1 = (values[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                w1 |= values[j] << (3 * (j - i) + 1)
            i += 10
            w1 |= values[i] << 31
            w2 = (values[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                w2 |= values[j] << (3 * (j - i) + 2)
            i += 10
            words += [w0 & MASK, w1 & MASK, w2 & MASK]
    return [_signed(w) for w in words]


def autogptq_pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    v = values.movedim(dim, 0)
    cols = [autogptq_pack_column(v[:, c].tolist(), bits) for c in range(v.shape[1])]
    return torch.tensor(cols, dtype=torch.int32).t().movedim(0, dim).contiguous()


def random_codes(shape, bits, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    codes.view(-1)[:2] = torch.tensor([0, 2**bits - 1])  # both ends of the range, sign bit included
    return codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip(bits, dim):
    shape = (64, 5) if dim == 0 else (5, 64)
    codes = random_codes(shape, bits, seed=bits)
    packed = pack_bits(codes, bits, dim=dim)
    expected = list(shape)
    expected[dim] = shape[dim] * bits // 32
    assert packed.dtype == torch.int32 and list(packed.shape) == expected
    assert torch.equal(unpack_bits(packed, bits, dim=dim), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_layout_equals_autogptq(bits, dim):
    shape = (96, 3) if dim == 0 else (3, 96)
    codes = random_codes(shape, bits, seed=10 + bits)
    assert torch.equal(pack_bits(codes, bits, dim=dim), autogptq_pack(codes, bits, dim))


@pytest.mark.parametrize("bits,n", [(2, 16), (4, 8), (4, 24), (8, 4), (8, 12)])
@pytest.mark.parametrize("dim", [0, 1])
def test_runs_shorter_than_32_values(bits, n, dim):
    """Widths that fill whole words but not a 32-value run (qzeros of an 8-output linear)."""
    shape = (n, 3) if dim == 0 else (3, n)
    codes = random_codes(shape, bits, seed=n)
    packed = pack_bits(codes, bits, dim=dim)
    assert packed.shape[dim] == n * bits // 32
    assert torch.equal(packed, autogptq_pack(codes, bits, dim))
    assert torch.equal(unpack_bits(packed, bits, dim=dim), codes)


def test_4bit_layout_by_hand():
    """Eight 4-bit values per int32, value j at bits 4j: 0..7 -> 0x76543210."""
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [15, 15, 15, 15, 15, 15, 15, 15]], dtype=torch.int32).t()
    packed = pack_bits(codes, 4, dim=0)
    assert packed.tolist() == [[0x76543210, -1]]


def test_3bit_value_straddles_words():
    """Value 10 of a 3-bit run sits at bits 30..32: two bits in word 0, one in word 1."""
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10, 0] = 0b101
    assert pack_bits(codes, 3, dim=0)[:, 0].tolist() == [_signed(0b01 << 30), 0b1, 0]


def test_pack_refuses_partial_words():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_bits(torch.zeros(16, 2, dtype=torch.int32), 3, dim=0)


def _result(bits: int, rows: int = 32, cols: int = 64, group_size: int = 32) -> QuantResult:
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    return rtn_quantize(W, bits=bits, group_size=group_size, sym=False, min_zero=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_gptq_v1_tensors(bits):
    res = _result(bits)
    t = pack_gptq(res, bits)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert t["qweight"].shape == (64 * bits // 32, 32) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, bits) and t["qzeros"].dtype == torch.int32
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (2, 32)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [c // 32 for c in range(64)]
    # v1: the stored zero point is the real one minus one.
    assert torch.equal(unpack_bits(t["qzeros"], bits, dim=1), res.zeros - 1)
    back = unpack_gptq(t, bits)
    assert torch.equal(back.codes, res.codes) and torch.equal(back.zeros, res.zeros)
    assert torch.equal(back.scales, res.scales) and torch.equal(back.g_idx, res.g_idx)
    assert torch.equal(dequantize_gptq(t, bits), res.dequantize())


def test_pack_gptq_refuses_zero_below_one():
    res = _result(4)
    res.zeros[0, 3] = 0
    with pytest.raises(ValueError, match="zero points must be >= 1"):
        pack_gptq(res, 4)
