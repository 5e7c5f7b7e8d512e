"""Size and perplexity of every output format, from one run of each method on the bench model.

Each method runs once through the engine (``workers.engine.run.quantize``, as a worker
does) and writes all its formats; every written folder is then scored by
``bench/tools/eval_ppl.py`` in a fresh process, loaded by that format's own client
(transformers + gptqmodel, compressed-tensors, the GGUF loader, bitsandbytes, PEFT).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.common import CACHE, OUR_PYTHON, TOOLS, fmt, md_table, pinned_env, run_measured
from bench.data import EVAL_WINDOWS, SEQ_LEN, bench_model, windows

CT = "compressed-tensors"
# (label, method, options, formats) ; the evaluator kind of each format below
RUNS = [
    ("GPTQ w4 g128", "gptq", {"bits": 4, "group_size": 128}, ["gptq", CT]),
    ("AWQ w4 g128", "awq", {"group_size": 128}, ["awq", CT]),
    ("RTN w4 g128", "rtn", {"bits": 4, "group_size": 128}, ["gptq", CT]),
    ("FP8 W8A8", "fp8", {}, [CT]),
    ("GGUF Q8_0", "gguf", {"quant_type": "Q8_0"}, ["gguf"]),
    ("GGUF Q4_K_M", "gguf", {"quant_type": "Q4_K_M"}, ["gguf"]),
    ("GGUF Q4_K_M + imatrix", "gguf", {"quant_type": "Q4_K_M", "imatrix": True}, ["gguf"]),
    ("bitsandbytes NF4", "bnb-4bit", {"quant_type": "nf4", "compute_dtype": "float32"}, ["bitsandbytes"]),
    ("LoftQ NF4 + r16", "loftq", {"rank": 16, "iterations": 5}, ["bitsandbytes-peft"]),
]
KIND = {"gptq": "gptq", "awq": "awq", CT: "ct", "gguf": "gguf", "bitsandbytes": "bnb", "bitsandbytes-peft": "peft"}


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.suffix in (".safetensors", ".gguf"))


def _ppl(model: Path, kind: str, held: Path, work: Path, label: str) -> float:
    res = run_measured(f"formats-{label}", OUR_PYTHON, TOOLS / "eval_ppl.py", ["--model", str(model), "--eval", str(held), "--kind", kind],
                       env=pinned_env())
    if not res.ok:
        raise RuntimeError(f"{label}: evaluation failed: {res.log_tail}")
    return res.result["perplexity"]


def run(quick: bool = False, log=print, *, model: Path | None = None, only: str | None = None) -> dict:
    """Every run of RUNS (those whose method is ``only``, when given) on the bench model (or ``model``)."""
    import torch

    from quantfarm import spec
    from storage.artifacts import LocalStore
    from workers.engine.pipeline import QuantizeRequest
    from workers.engine.run import quantize

    model = Path(model) if model else bench_model(quick)
    _, held = windows(model, num_samples=128, seq_len=SEQ_LEN, eval_windows=32 if quick else EVAL_WINDOWS)
    work = CACHE / "formats"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.set_num_threads(2)
    rows = [{"label": "unquantized (fp32)", "format": "safetensors", "size_bytes": _size(model),
             "perplexity": _ppl(model, "dense", held, work, "fp32")}]
    for n, (label, method, options, formats) in enumerate(RUNS):
        if only and method != only:
            continue
        key = f"{n}-{method}"  # a method may run twice (gguf Q4_K_M with and without the importance matrix)
        log(f"formats bench: {label} -> {', '.join(formats)}")
        req = QuantizeRequest(source_dir=model, method=method, options=spec.method_options()[method](**options),
                              calibration=spec.Calibration(num_samples=16 if quick else 128, seq_len=SEQ_LEN), formats=formats)
        t0 = time.perf_counter()
        res = quantize(req, LocalStore(work / f"{key}-ckpt"), work / key, device=torch.device("cpu"))
        seconds = time.perf_counter() - t0
        for out in res.outputs:
            rows.append({"label": label, "format": out.format, "size_bytes": _size(out.out_dir), "quantize_s": round(seconds, 2),
                         "perplexity": _ppl(out.out_dir, KIND[out.format], held, work, f"{key}-{out.format}")})
    return {"model": model.name, "eval_windows": int(torch.load(held).shape[0]), "rows": rows}


def table(r: dict) -> str:
    base = r["rows"][0]
    rows = [[x["label"], x["format"], f"{x['size_bytes'] / 2**20:.2f}", f"{x['size_bytes'] / base['size_bytes']:.3f}",
             fmt(x["perplexity"], 3), f"{x['perplexity'] - base['perplexity']:+.3f}", fmt(x.get("quantize_s"))] for x in r["rows"]]
    return md_table(["method", "format", "size MiB", "size / fp32", "perplexity", "Δ vs fp32", "quantize s (all formats)"], rows)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    opt = {k: args[args.index(k) + 1] for k in ("--model", "--only") if k in args}
    out = run("--quick" in args, model=opt.get("--model"), only=opt.get("--only"))
    print(json.dumps(out, indent=1))
    print(table(out))
