"""Bit packing for the ``quant_method: awq`` checkpoint (GEMM and GEMV kernels).

Layouts as AutoAWQ's ``WQLinear_GEMM`` / ``WQLinear_GEMV`` write them, which is
what gptqmodel (through transformers) and vLLM read. Codes are 4-bit, eight to
an int32 word, the value at position ``i`` of a word sitting at bits ``4i``.

- GEMM: ``qweight [in, out/8]`` and ``qzeros [in/g, out/8]`` pack the *output*
  dimension, with each word's eight columns interleaved as ``AWQ_ORDER``;
  ``scales [in/g, out]`` fp16.
- GEMV: ``qweight [out, in/8]`` packs the *input* dimension in natural order;
  ``qzeros [out, W]`` and ``scales [out, 8W]`` hold the groups along the row,
  zero-padded to the width ``W`` the CUDA kernel expects.

Zeros are stored as is (no GPTQ-v1 ``-1``). The loader computes
``fp16(scale * (q - zero))``; :func:`dequantize_awq` does the same.
"""

from __future__ import annotations

import torch

from workers.engine.quant import QuantResult

BITS = 4
PACK = 32 // BITS  # values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word slot i holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in slot AWQ_REVERSE_ORDER[j]
_KEYS = ("qweight", "qzeros", "scales")


def pack_last(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack 4-bit ``values`` along the last dim, eight per int32, slot i <- column ``order[i]``."""
    *lead, n = values.shape
    if n % PACK:
        raise ValueError(f"cannot pack {n} 4-bit values into whole 32-bit words")
    v = values.to(torch.int64).reshape(*lead, n // PACK, PACK)
    if order is not None:
        v = v[..., list(order)]
    if int(v.min()) < 0 or int(v.max()) > 15:
        raise ValueError("4-bit codes must lie in [0, 15]")
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=v.device)
    words = (v << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_last(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_last`; ``order`` is the *packing* order."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=words.device)
    slots = (words.to(torch.int64)[..., None] >> shifts) & 15  # [..., words, 8] in slot order
    if order is not None:
        inverse = [order.index(j) for j in range(PACK)]
        slots = slots[..., inverse]
    return slots.flatten(-2).to(torch.int32)


def _check(res: QuantResult, group_size: int) -> None:
    rows, cols = res.codes.shape
    if cols % group_size or res.scales.shape != (cols // group_size, rows):
        raise ValueError(f"AWQ needs plain group-wise parameters: {cols} columns, group size {group_size}")


# --- GEMM -------------------------------------------------------------------


def pack_gemm(res: QuantResult, group_size: int) -> dict[str, torch.Tensor]:
    """Return ``qweight``, ``qzeros``, ``scales`` in AutoAWQ's GEMM layout for one linear."""
    _check(res, group_size)
    return {
        "qweight": pack_last(res.codes.t(), AWQ_ORDER).contiguous(),
        "qzeros": pack_last(res.zeros, AWQ_ORDER).contiguous(),
        "scales": res.scales.to(torch.float16).contiguous(),
    }


def unpack_gemm(t: dict[str, torch.Tensor], group_size: int) -> QuantResult:
    codes = unpack_last(t["qweight"], AWQ_ORDER).t().contiguous()
    zeros = unpack_last(t["qzeros"], AWQ_ORDER)
    cols = codes.shape[1]
    g_idx = (torch.arange(cols) // group_size).to(torch.int32)
    return QuantResult(codes, t["scales"].float(), zeros, g_idx)


# --- GEMV -------------------------------------------------------------------


def gemv_zeros_width(in_features: int, group_size: int) -> int:
    """Words of ``qzeros`` per row: groups rounded up to whole words, then to the kernel's multiple."""
    multiplier = {128: 1, 64: 2, 32: 4, 16: 8}.get(min(group_size, 128))
    if multiplier is None:
        raise ValueError(f"GEMV packing has no layout for group size {group_size}")
    words = -(-(in_features // group_size) // PACK)
    return -(-words // multiplier) * multiplier


def pack_gemv(res: QuantResult, group_size: int) -> dict[str, torch.Tensor]:
    """Return ``qweight``, ``qzeros``, ``scales`` in AutoAWQ's GEMV layout for one linear."""
    _check(res, group_size)
    rows, cols = res.codes.shape
    width = gemv_zeros_width(cols, group_size)
    zeros = torch.zeros(rows, width * PACK, dtype=torch.int32)
    zeros[:, : cols // group_size] = res.zeros.t()
    scales = torch.zeros(rows, width * PACK, dtype=torch.float16)
    scales[:, : cols // group_size] = res.scales.t().to(torch.float16)
    return {"qweight": pack_last(res.codes).contiguous(), "qzeros": pack_last(zeros).contiguous(), "scales": scales}


def unpack_gemv(t: dict[str, torch.Tensor], group_size: int) -> QuantResult:
    codes = unpack_last(t["qweight"])
    cols = codes.shape[1]
    groups = cols // group_size
    zeros = unpack_last(t["qzeros"])[:, :groups].t().contiguous()
    scales = t["scales"][:, :groups].t().float().contiguous()
    return QuantResult(codes, scales, zeros, (torch.arange(cols) // group_size).to(torch.int32))


# --- both -------------------------------------------------------------------

PACKERS = {"gemm": (pack_gemm, unpack_gemm), "gemv": (pack_gemv, unpack_gemv)}


def pack_awq(res: QuantResult, group_size: int, version: str) -> dict[str, torch.Tensor]:
    return PACKERS[version][0](res, group_size)


def unpack_awq(t: dict[str, torch.Tensor], group_size: int, version: str) -> QuantResult:
    return PACKERS[version][1](t, group_size)


def dequantize_awq(t: dict[str, torch.Tensor], group_size: int, version: str) -> torch.Tensor:
    """Return the float32 ``[out, in]`` weight the loader computes with: ``fp16(scale * (q - zero))``."""
    return unpack_awq(t, group_size, version).dequantize()


def awq_keys(name: str) -> list[str]:
    return [f"{name}.{k}" for k in _KEYS]
