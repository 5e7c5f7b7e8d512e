"""Bit packing for the standard checkpoint formats (GPTQ v1 and AWQ GEMM).

Values are packed as a little-endian bit stream of 32-bit words, which is the
layout AutoGPTQ/GPTQModel use for 2/4/8 bits and also their 3-bit layout
(a value may straddle two words).
"""

from __future__ import annotations

import torch

from workers.engine.quant import QuantResult

_MASK32 = (1 << 32) - 1


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer ``values`` in ``[0, 2**bits)`` along ``dim`` into int32 words."""
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole 32-bit words")
    pad = -n % 32  # e.g. 8 four-bit values: pad to a 32-value run, keep its first word
    v = torch.nn.functional.pad(v, (0, pad)).reshape(*v.shape[:-1], (n + pad) // 32, 32)  # 32 values fill `bits` words
    words = torch.zeros(*v.shape[:-1], bits, dtype=torch.int64, device=v.device)
    for j in range(32):
        k, off = divmod(bits * j, 32)
        words[..., k] |= v[..., j] << off
        if off + bits > 32:  # spills into the next word
            words[..., k + 1] |= v[..., j] >> (32 - off)
    words = _to_int32(words.reshape(*v.shape[:-2], (n + pad) // 32 * bits)[..., : n * bits // 32])
    return words.movedim(-1, dim).contiguous()


def unpack_bits(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 words along ``dim`` back to int32 values."""
    w = words.movedim(dim, -1).to(torch.int64) & _MASK32
    n = w.shape[-1] * 32 // bits
    w = torch.nn.functional.pad(w, (0, -w.shape[-1] % bits))
    nw = w.shape[-1]
    w = w.reshape(*w.shape[:-1], nw // bits, bits)
    out = torch.zeros(*w.shape[:-1], 32, dtype=torch.int64, device=w.device)
    maxq = 2**bits - 1
    for j in range(32):
        k, off = divmod(bits * j, 32)
        val = w[..., k] >> off
        if off + bits > 32:
            val = val | (w[..., k + 1] << (32 - off))
        out[..., j] = val & maxq
    out = out.reshape(*w.shape[:-2], (nw // bits) * 32)[..., :n].to(torch.int32)
    return out.movedim(-1, dim).contiguous()


# --- GPTQ (checkpoint_format "gptq", i.e. v1: zeros stored minus one) ---------


def pack_gptq(res: QuantResult, bits: int) -> dict[str, torch.Tensor]:
    """Return ``qweight``, ``qzeros``, ``scales``, ``g_idx`` for one linear."""
    maxq = 2**bits - 1
    if int(res.zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero-1; zero points must be >= 1")
    return {
        "qweight": pack_bits(res.codes.t().contiguous(), bits, dim=0),
        "qzeros": pack_bits((res.zeros - 1) & maxq, bits, dim=1),
        "scales": res.scales.to(torch.float16).contiguous(),
        "g_idx": res.g_idx.to(torch.int32).clone(),  # parts of a stacked solve share it; safetensors refuses shared memory
    }


def unpack_gptq(t: dict[str, torch.Tensor], bits: int) -> QuantResult:
    codes = unpack_bits(t["qweight"], bits, dim=0).t().contiguous()
    zeros = unpack_bits(t["qzeros"], bits, dim=1) + 1
    return QuantResult(codes, t["scales"].float(), zeros, t["g_idx"].to(torch.int32))


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Return the float32 ``[out, in]`` weight a GPTQ kernel computes with."""
    return unpack_gptq(t, bits).dequantize()
