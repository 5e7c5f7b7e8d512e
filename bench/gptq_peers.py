"""GPTQ: our engine vs GPTQModel vs llm-compressor, side by side in one run.

Same trained Llama, same calibration windows (one .pt every tool reads), same
config: 4-bit, group 128 (or the largest group the dims allow), symmetric, no
act-order (GPTQModel's group-aware reordering off too), damp 0.01, fp32
compute, same thread count and the same windows per forward batch. Each
quantization runs in its own process: peak RSS from wait4, wall time of the
whole process and of the quantization proper (load + calibrate + solve +
save, imports excluded). Every output is scored by one evaluator in our venv
on the same held-out windows.

    .venv/bin/python -m bench.gptq_peers [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import CACHE
from bench.compare import (
    OUR_PYTHON,
    TOOLS,
    Tool,
    evaluate_all,
    goals,
    goals_text,
    run_tools,
    summarize,
    table,
    venv_python,
)
from bench.data import CALIB_SAMPLES, EVAL_WINDOWS, SEQ_LEN, bench_model, windows

BITS, DAMP = 4, 0.01


def group_size_for(model_dir: Path, want: int = 128) -> int:
    """The largest group <= ``want`` dividing every linear's in_features."""
    cfg = json.loads((model_dir / "config.json").read_text())
    ins = [cfg["hidden_size"], cfg["intermediate_size"]]
    for g in (want, 64, 32):
        if all(i % g == 0 for i in ins):
            return g
    return -1


def tools(model: Path, calib: Path, gs: int, batch: int, work: Path, bits: int = BITS, variants: bool = True) -> dict[str, Tool]:
    """The quantizers, all with the same config. ``ours`` is the engine's defaults (true_sequential on)."""
    common = ["--model", str(model), "--calib", str(calib)]
    ours = {"bits": bits, "group_size": gs, "sym": True, "desc_act": False, "damp_percent": DAMP, "true_sequential": True}
    gm = {"bits": bits, "group_size": gs, "sym": True, "desc_act": False, "act_group_aware": False, "damp_percent": DAMP}
    rtn = {"bits": bits, "group_size": gs, "sym": True}
    ts = {
        "ours": Tool(OUR_PYTHON, TOOLS / "ours.py", [*common, "--method", "gptq", "--options", json.dumps(ours)], work / "ours", "gptq"),
        "gptqmodel": Tool(OUR_PYTHON, TOOLS / "gptqmodel_quant.py",
                          [*common, "--method", "gptq", "--options", json.dumps(gm), "--batch-size", str(batch)], work / "gptqmodel", "gptq"),
        "llm-compressor": Tool(venv_python("llmc"), TOOLS / "llmc_quant.py",
                               [*common, "--bits", str(bits), "--group-size", str(gs), "--damp", str(DAMP), "--batch-size", str(batch)],
                               work / "llm-compressor", "compressed-tensors"),
    }
    if variants:
        # llm-compressor has no within-layer true-sequential pass; this is ours doing the same amount of work.
        ts["ours, true_sequential off"] = Tool(OUR_PYTHON, TOOLS / "ours.py",
                                               [*common, "--method", "gptq", "--options", json.dumps({**ours, "true_sequential": False})],
                                               work / "ours-nots", "gptq", context=True)
    if bits in (4, 8):  # the engine's RTN takes 4 or 8 bits
        ts["ours RTN (reference)"] = Tool(OUR_PYTHON, TOOLS / "ours.py", [*common, "--method", "rtn", "--options", json.dumps(rtn)],
                                          work / "rtn", "gptq", context=True)
    return ts


def run(quick: bool = False, repeats: int = 1, log=print, bits: int = BITS, variants: bool = True) -> dict:
    """Run every tool ``repeats`` times at ``bits``, score the outputs, check the goals."""
    from workers.engine.pipeline import BATCH_TOKENS

    model = bench_model(quick)
    n, e = (32, 16) if quick else (CALIB_SAMPLES, EVAL_WINDOWS)
    calib, held = windows(model, num_samples=n, seq_len=SEQ_LEN, eval_windows=e)
    gs = group_size_for(model)
    batch = max(1, BATCH_TOKENS // SEQ_LEN)  # the engine's batch; the peers get the same windows per forward
    work = CACHE / "runs" / f"gptq-w{bits}"
    ts = tools(model, calib, gs, batch, work, bits, variants)
    runs = run_tools(ts, repeats, work / "logs", f"gptq w{bits}", log)
    summaries = {k: {**summarize(v), "context": ts[k].context} for k, v in runs.items()}
    log(f"[gptq w{bits}] evaluating")
    fp32 = evaluate_all(ts, summaries, model, held, work / "logs")
    return {
        "config": {"bits": bits, "group_size": gs, "sym": True, "desc_act": False, "damp": DAMP, "calib_windows": n, "seq_len": SEQ_LEN,
                   "eval_windows": e, "batch_windows": batch, "repeats": repeats, "model": model.name},
        "fp32_perplexity": fp32, "tools": summaries, "goals": goals(summaries),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few windows: a smoke run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--bits", type=int, default=BITS)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    res = run(a.quick, a.repeats, bits=a.bits)
    print(table(res))
    print(goals_text(res["goals"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
