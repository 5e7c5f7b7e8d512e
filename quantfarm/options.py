"""Each quantization method's options: one strict model per method, named in the registry."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GPTQOptions(Strict):
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="Columns sharing one scale; -1 for per-channel")
    sym: bool = Field(True, description="Symmetric quantization (zero point fixed at the middle)")
    desc_act: bool = Field(True, description="Act-order: quantize columns by decreasing Hessian diagonal")
    static_groups: bool = Field(
        True, description="With act-order, fix group parameters before the solve (groups stay in column order: no inference cost)",
    )
    damp_percent: float = Field(0.01, gt=0, le=1, description="Dampening added to the Hessian diagonal, as a fraction of its mean")
    true_sequential: bool = Field(True, description="Quantize sub-modules in order, feeding quantized outputs forward")
    moe_calibration: Literal["all_experts", "routed"] = Field(
        "all_experts", description="MoE models: every calibration token feeds every expert's statistics (the router "
                                   "still decides the output), or only the tokens the router sends it",
    )
    min_expert_tokens: int = Field(
        64, ge=1, le=1_000_000, description="MoE with routed calibration: an expert sent fewer tokens is rounded to nearest (with a warning)",
    )


class RTNOptions(Strict):
    bits: Literal[4, 8] = Field(4, description="Bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="Columns sharing one scale; -1 for per-channel")
    sym: bool = Field(True, description="Symmetric quantization")


class AWQOptions(Strict):
    bits: Literal[4] = Field(4, description="Bits per weight (AWQ kernels take 4)")
    group_size: Literal[32, 64, 128] = Field(128, description="Columns sharing one scale")
    zero_point: bool = Field(True, description="Asymmetric quantization with a zero point")
    version: Literal["gemm", "gemv"] = Field("gemm", description="Kernel packing the checkpoint is written for")
    alpha_search: Literal["coarse-to-fine", "full"] = Field(
        "coarse-to-fine",
        description="Scale-exponent search: every 4th of AutoAWQ's 20 grid points, then the best one's neighbours "
                    "(about half the time), or all 20",
    )


class BnB4Options(Strict):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="Quantize the quantization constants too")
    compute_dtype: Literal["float16", "bfloat16", "float32"] = Field("bfloat16", description="Matmul dtype")
    skip_modules: list[str] = Field(default_factory=list, description="Module names kept in full precision")


class BnB8Options(Strict):
    threshold: float = Field(6.0, ge=0, description="LLM.int8() outlier threshold")
    skip_modules: list[str] = Field(default_factory=list, description="Module names kept in full precision")


class FP8Options(Strict):
    """FP8 W8A8 has no knobs: per-channel e4m3 weights, dynamic per-token activations."""


class GGUFOptions(Strict):
    quant_type: Literal["Q8_0", "Q4_K_M"] = Field(
        "Q8_0", description="llama.cpp quantization type: Q8_0 (8-bit blocks of 32, one fp16 scale each) or Q4_K_M "
                            "(4-bit k-quants, with 6-bit ones where llama-quantize's Q4_K_M puts them)",
    )
    imatrix: bool = Field(
        False, description="Q4_K_M: weight the k-quant search by an importance matrix (mean squared input activations "
                           "per linear) from a calibration pass; Q8_0 has no search to weight",
    )

    @model_validator(mode="after")
    def _imatrix_needs_k_quants(self):
        if self.imatrix and self.quant_type == "Q8_0":
            raise ValueError("imatrix weights the k-quant search of Q4_K_M; Q8_0 rounds to nearest and would ignore it")
        return self


class LoftQOptions(Strict):
    bits: Literal[4] = Field(4, description="Bits of the base (NF4)")
    rank: int = Field(16, ge=1, le=256, description="LoRA rank of the adapters")
    iterations: int = Field(5, ge=1, le=20, description="LoftQ alternations of quantize-the-rest and refit-the-adapter")
    target_modules: list[str] = Field(default_factory=list, max_length=64,
                                      description="Linears to adapt, by name or name suffix; empty: every linear of the decoder layers")
