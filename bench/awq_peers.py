"""AWQ: our engine vs AutoAWQ 0.2.9 vs GPTQModel's AWQ, side by side in one run.

Same trained Llama and calibration windows as the GPTQ bench; config w4,
group 128, zero point, GEMM packing; fp32 compute; same threads. Every
output is an AWQ GEMM checkpoint, loaded for scoring by the same loader
(transformers + gptqmodel's CPU AWQ kernel, fp32) in our venv.

    .venv/bin/python -m bench.awq_peers [--quick] [--repeats N]
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
from bench.gptq_peers import group_size_for


def ours_available() -> str | None:
    """None when our engine has a working ``awq`` method, else why not."""
    try:
        from workers.engine.methods import METHODS
    except Exception as exc:  # noqa: BLE001 - any import failure means "pending", with its reason
        return f"engine import failed: {exc}"
    return None if "awq" in METHODS else "workers.engine.methods has no 'awq' method yet"


def tools(model: Path, calib: Path, gs: int, batch: int, work: Path) -> dict[str, Tool]:
    common = ["--model", str(model), "--calib", str(calib)]
    ours = {"bits": 4, "group_size": gs, "zero_point": True, "version": "gemm"}
    gm = {"method": "awq", "format": "gemm", "bits": 4, "group_size": gs, "sym": False}
    rtn = {"bits": 4, "group_size": gs, "sym": False}
    return {
        "ours": Tool(OUR_PYTHON, TOOLS / "ours.py", [*common, "--method", "awq", "--options", json.dumps(ours)], work / "ours", "awq"),
        "autoawq": Tool(venv_python("autoawq"), TOOLS / "autoawq_quant.py", [*common, "--group-size", str(gs), "--version", "GEMM"],
                        work / "autoawq", "awq"),
        "gptqmodel AWQ": Tool(OUR_PYTHON, TOOLS / "gptqmodel_quant.py",
                              [*common, "--method", "awq", "--options", json.dumps(gm), "--batch-size", str(batch), "--dtype", "bfloat16"],
                              work / "gptqmodel-awq", "awq"),
        "ours, full α grid (reference)": Tool(OUR_PYTHON, TOOLS / "ours.py",
                                              [*common, "--method", "awq", "--options", json.dumps({**ours, "alpha_search": "full"})],
                                              work / "ours-full-grid", "awq", context=True),
        "ours RTN asym (reference)": Tool(OUR_PYTHON, TOOLS / "ours.py", [*common, "--method", "rtn", "--options", json.dumps(rtn)],
                                          work / "rtn", "gptq", context=True),
    }


def run(quick: bool = False, repeats: int = 1, log=print) -> dict:
    from workers.engine.pipeline import BATCH_TOKENS

    model = bench_model(quick)
    n, e = (32, 16) if quick else (CALIB_SAMPLES, EVAL_WINDOWS)
    calib, held = windows(model, num_samples=n, seq_len=SEQ_LEN, eval_windows=e)
    gs = group_size_for(model)
    batch = max(1, BATCH_TOKENS // SEQ_LEN)
    work = CACHE / "runs" / "awq"
    ts = tools(model, calib, gs, batch, work)
    pending = ours_available()
    if pending:
        log(f"[awq] ours pending: {pending}")
        del ts["ours"]
    runs = run_tools(ts, repeats, work / "logs", "awq", log)
    summaries = {k: {**summarize(v), "context": ts[k].context} for k, v in runs.items()}
    if pending:
        summaries = {"ours": {"ok": False, "error": f"pending ({pending})"}, **summaries}
    log("[awq] evaluating")
    fp32 = evaluate_all(ts, {k: v for k, v in summaries.items() if k in ts}, model, held, work / "logs")
    return {
        "config": {"bits": 4, "group_size": gs, "zero_point": True, "version": "gemm", "calib_windows": n, "seq_len": SEQ_LEN,
                   "eval_windows": e, "batch_windows": batch, "repeats": repeats, "model": model.name},
        "fp32_perplexity": fp32, "tools": summaries, "goals": goals(summaries),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few windows: a smoke run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    res = run(a.quick, a.repeats)
    print(table(res))
    print(goals_text(res["goals"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
