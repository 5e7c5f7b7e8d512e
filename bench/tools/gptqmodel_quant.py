"""Quantize with GPTQModel (GPTQ or AWQ) on the shared calibration windows.

Runs in our venv (gptqmodel is installed there) on CPU with
GPTQMODEL_CPU_WORKERS set to the bench's thread count.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from _child import (
    T_START,
    load_windows,
    model_type,
    parser,
    pin_threads,
    versions,
    warm_imports,
    write_result,
)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    ap.add_argument("--options", default="{}", help="QuantizeConfig fields as JSON")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="model dtype (its AWQ packer takes only float16/bfloat16); auto: its own choice (bf16 on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a = ap.parse_args()
    threads = pin_threads()

    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    warm_imports(model_type(a.model))
    t_imports = time.perf_counter() - T_START
    windows = load_windows(a.calib)
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    opts = {"device": a.device, **json.loads(a.options)}
    if a.method == "awq":
        opts.setdefault("method", "awq")
    shutil.rmtree(a.out, ignore_errors=True)

    t0, c0 = time.perf_counter(), time.process_time()
    # fp32 like the source and the other tools where it can (gptqmodel would pick bf16 on CPU by itself).
    model = GPTQModel.load(a.model, QuantizeConfig(**opts), dtype=a.dtype if a.dtype == "auto" else getattr(torch, a.dtype))
    t_load = time.perf_counter() - t0
    # On CPU the AWQ GEMM path must be told to use the portable torch kernel (its default asks for CUDA).
    kw = {"backend": BACKEND.AWQ_TORCH} if a.method == "awq" and a.device == "cpu" else {}
    model.quantize(calib, batch_size=a.batch_size, calibration_sort=None, **kw)
    t_solve = time.perf_counter() - t0 - t_load
    model.save(a.out)
    t_quant = time.perf_counter() - t0
    qcfg = json.loads(Path(a.out, "config.json").read_text()).get("quantization_config", {})
    write_result(
        a.result, tool="gptqmodel", method=a.method, threads=threads, import_seconds=round(t_imports, 3),
        quant_seconds=round(t_quant, 3), quant_cpu_seconds=round(time.process_time() - c0, 3), load_seconds=round(t_load, 3), solve_seconds=round(t_solve, 3),
        quantization_config=qcfg, dtype=str(getattr(getattr(model, "model", None), "dtype", a.dtype)), versions=versions("gptqmodel", "torch", "transformers"),
    )


if __name__ == "__main__":
    main()
