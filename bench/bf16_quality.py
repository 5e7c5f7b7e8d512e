"""bf16 compute on CPU for a bf16 source: its quality cost, and bf16 against fp32 Hessians (issue 12).

On a trained Llama saved in bf16 (tests/support/trained.py's default spec), GPTQ
at each bit width three ways, in this process: float32 compute (the path
before), bf16 compute with float32 Hessians (the bf16 activations upcast), and
bf16 compute with bf16 Hessians (the engine's path on a CPU with AMX or
AVX512-BF16). Every output is scored by one evaluator (bench/tools/eval_ppl.py,
the gptq kernel in fp32) on the same held-out windows. Also: the relative
Frobenius error of every bf16 Hessian against the float32 one from the same
activations, and the time of one Hessian batch (4096 tokens) both ways at the
TinyLlama widths, alternating. The table goes into RESULTS.md's
``realistic_width`` section by hand (it is one part of that section).

    .venv/bin/python -m bench.bf16_quality [--bits 4 --bits 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.common import (
    CACHE,
    OUR_PYTHON,
    TOOLS,
    pinned_env,
    run_measured,
    started_and_load,
)
from bench.data import windows


def bf16_products(H: torch.Tensor | None, nsamples: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``accumulate_hessian`` with bf16 products: each batch's ``xᵀx`` multiplied in bf16 (rounded to bf16 once) and
    summed into a float32 H, with the same symmetric blocks at width >= 512. CPU torch has no bf16 matmul with a
    float32 output (``out_dtype`` is CUDA-only), so the rounding cannot be avoided."""
    from workers.engine.quant import _SYMMETRIC_FROM

    X = X.reshape(-1, X.shape[-1]).bfloat16()
    cols, total = X.shape[1], nsamples + X.shape[0]
    H = torch.zeros(cols, cols) if H is None else H
    beta, alpha = nsamples / total, 2.0 / total
    if cols < _SYMMETRIC_FROM:
        H.mul_(beta).add_(X.t() @ X, alpha=alpha)
        return H, total
    h = cols // 2
    A, B = X[:, :h], X[:, h:]
    for dst, a, b in ((H[:h, :h], A, A), (H[h:, h:], B, B), (H[:h, h:], A, B)):
        dst.mul_(beta).add_(a.t() @ b, alpha=alpha)
    H[h:, :h] = H[:h, h:].t()
    return H, total


def quantize_variant(model: Path, calib: Path, out: Path, bits: int, bf16_compute: bool, bf16_hessian: bool) -> dict:
    """One GPTQ run of our engine: quantize seconds, and the relative Frobenius errors of bf16 Hessians against float32 ones."""
    from quantfarm.options import GPTQOptions
    from quantfarm.spec import Calibration
    from storage.artifacts import LocalStore
    from workers.engine import pipeline, quant
    from workers.engine.methods import gptq
    from workers.engine.model import prefer_cpu_bf16
    from workers.engine.run import quantize

    ids = torch.load(calib)
    pipeline.calibration_ids = lambda calibration, tokenizer, **_: ids.clone()
    prefer_cpu_bf16(bf16_compute)
    accumulate, factor_hessian = quant.accumulate_hessian, gptq.factor_hessian
    refs: dict[int, torch.Tensor] = {}
    errors: list[float] = []

    def accumulate_measured(H, n, X):
        if not bf16_hessian:
            return accumulate(H, n, X)  # bf16 activations are upcast: float32 products
        ref = refs.pop(id(H), None) if H is not None else None
        H, total = bf16_products(H, n, X)
        refs[id(H)], _ = accumulate(ref, n, X.float())
        return H, total

    def factor_measured(H, *args):
        ref = refs.pop(id(H), None)
        if ref is not None:
            errors.append(float((H - ref).norm() / ref.norm()))
        return factor_hessian(H, *args)

    quant.accumulate_hessian, gptq.factor_hessian = accumulate_measured, factor_measured
    ckpt = out.parent / (out.name + ".checkpoints")
    for d in (out, ckpt):
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True)
    req = pipeline.QuantizeRequest(source_dir=model, method="gptq", options=GPTQOptions(bits=bits, group_size=128),
                                   calibration=Calibration(num_samples=ids.shape[0], seq_len=ids.shape[1]), base_model="bench")
    row: dict = {}
    try:
        t0 = time.perf_counter()
        quantize(req, LocalStore(ckpt), out, device=torch.device("cpu"))
        row["quantize_s"] = round(time.perf_counter() - t0, 2)
    except torch.linalg.LinAlgError as exc:  # a Hessian the bf16 rounding left indefinite
        row["error"] = str(exc).splitlines()[0]
    finally:
        quant.accumulate_hessian, gptq.factor_hessian = accumulate, factor_hessian
        prefer_cpu_bf16(None)
        shutil.rmtree(ckpt, ignore_errors=True)
    if errors:
        row.update(hessian_rel_err_median=statistics.median(errors), hessian_rel_err_max=max(errors), hessians=len(errors))
    return row


def hessian_times(rounds: int = 3) -> dict[int, dict[str, list[float]]]:
    """CPU seconds of one 4096-token Hessian batch at widths 2048 and 5632: float32 products vs bf16 ones, alternating."""
    from workers.engine.quant import accumulate_hessian

    torch.manual_seed(0)
    out: dict[int, dict[str, list[float]]] = {}
    for cols in (2048, 5632):
        X = (torch.randn(4096, cols) * torch.rand(cols) * 3 + torch.randn(cols)).bfloat16()
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for _ in range(rounds):
            for name, f in (("float32", accumulate_hessian), ("bfloat16", bf16_products)):
                H, n = f(None, 0, X)  # warm, and a non-empty H as in a real run
                c0 = time.process_time()
                f(H, n, X)
                times[name].append(round(time.process_time() - c0, 3))
        out[cols] = times
    return out


def main() -> None:
    import sys

    from tests.support.trained import trained_llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, action="append", help="repeatable; default 4 and 3")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    torch.set_num_threads(2)
    started, load = started_and_load()
    model = trained_llama(CACHE / "models", dtype=torch.bfloat16)
    calib, held = windows(model)
    work = CACHE / "runs" / "bf16-quality"
    variants = {"float32 compute": (False, False), "bf16 compute, float32 Hessians": (True, False),
                "bf16 compute, bf16 Hessians": (True, True)}
    rows = []
    base = run_measured("eval source", OUR_PYTHON, TOOLS / "eval_ppl.py", ["--model", str(model), "--eval", str(held), "--kind", "dense"],
                        env=pinned_env(), log_dir=work / "logs").result.get("perplexity")
    for bits in a.bits or [4, 3]:
        for label, (bf16_compute, bf16_hessian) in variants.items():
            out = work / f"w{bits}-{label.replace(' ', '').replace(',', '-')}"
            row = {"bits": bits, "variant": label, **quantize_variant(model, calib, out, bits, bf16_compute, bf16_hessian)}
            if "error" not in row:
                e = run_measured(f"eval {label}", OUR_PYTHON, TOOLS / "eval_ppl.py",
                                 ["--model", str(out), "--eval", str(held), "--kind", "gptq"], env=pinned_env(), log_dir=work / "logs")
                row["perplexity"] = e.result.get("perplexity")
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    res = {"command": " ".join([".venv/bin/python -m bench.bf16_quality", *sys.argv[1:]]), "started": started, "load": load,
           "model": model.name, "source_perplexity": base, "rows": rows, "hessian_cpu_s": hessian_times()}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
