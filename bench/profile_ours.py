"""Where our GPTQ time goes: cProfile of one ``quantize`` call, grouped by engine stage.

    .venv/bin/python -m bench.profile_ours [--quick]

Runs bench/tools/ours.py with ``--profile`` on the GPTQ bench's model and
windows and prints the cumulative time of the engine's stages.
"""

from __future__ import annotations

import argparse
import json
import pstats

from bench.common import CACHE, OUR_PYTHON, TOOLS, md_table, pinned_env, run_measured
from bench.data import CALIB_SAMPLES, EVAL_WINDOWS, SEQ_LEN, bench_model, windows

# (label, file suffix, function): cumulative seconds of each; nested rows are indented.
STAGES = [
    ("quantize() total", "engine/run.py", "quantize"),
    ("open model + method (prepare)", "engine/pipeline.py", "prepare"),
    ("fingerprint (source file hashes)", "engine/pipeline.py", "fingerprint_parts"),
    ("capture layer-0 inputs", "engine/model.py", "capture_inputs"),
    ("load layer weights", "engine/model.py", "load_layer"),
    ("quantize_layer (GPTQ, all of it)", "methods/gptq.py", "quantize_layer"),
    ("  layer walk: early-stopping passes", "engine/walk.py", "watch"),
    ("    accumulate_hessian", "engine/quant.py", "accumulate_hessian"),
    ("  solve_group", "methods/gptq.py", "solve_group"),
    ("    factor_hessian (one Cholesky)", "engine/quant.py", "factor_hessian"),
    ("    gptq_quantize (column sweep)", "engine/quant.py", "gptq_quantize"),
    ("      find_params", "engine/quant.py", "find_params"),
    ("  set quantized weight (true_sequential)", "engine/quant.py", "dequantize"),
    ("  layer walk: final pass (next layer's inputs)", "engine/walk.py", "finish"),
    ("plain layer forwards (replay, evaluation)", "engine/model.py", "forward_layer"),
    ("pack (pack_gptq)", "engine/pack.py", "pack_gptq"),
    ("apply (dequantize into layer)", "methods/gptq.py", "apply"),
    ("checkpoint save", "engine/checkpoint.py", "save"),
    ("release_heap (malloc_trim)", "engine/pipeline.py", "release_heap"),
    ("export", "engine/export.py", "export"),
]


def stage_table(prof_path: str) -> tuple[str, list[dict]]:
    st = pstats.Stats(prof_path).stats
    total = None
    rows = []
    for label, file_suffix, func in STAGES:
        ct = ncalls = 0
        for (f, _line, fn), (_cc, nc, _tt, cum, _callers) in st.items():
            if fn == func and (f.endswith(file_suffix) or file_suffix == "~" and f == "~"):
                ct += cum
                ncalls += nc
        if total is None:
            total = ct or 1.0
        rows.append({"stage": label, "seconds": round(ct, 2), "share": round(100 * ct / total, 1), "calls": ncalls})
    return md_table(["stage (cumulative)", "seconds", "% of quantize()", "calls"],
                    [[r["stage"].replace("  ", "&nbsp;&nbsp;"), f"{r['seconds']:.2f}", f"{r['share']:.1f}", r["calls"]] for r in rows]), rows


def top_functions(prof_path: str, n: int = 12) -> list[dict]:
    st = pstats.Stats(prof_path).stats
    items = sorted(st.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{fn} ({f.rsplit('/', 2)[-1]}:{line})", "self_s": round(tt, 2), "calls": nc} for (f, line, fn), (_cc, nc, tt, _ct, _c) in items]


def run(quick: bool = False, log=print) -> dict:
    model = bench_model(quick)
    n, e = (32, 16) if quick else (CALIB_SAMPLES, EVAL_WINDOWS)
    calib, _held = windows(model, num_samples=n, seq_len=SEQ_LEN, eval_windows=e)
    work = CACHE / "runs" / "profile"
    work.mkdir(parents=True, exist_ok=True)
    prof = work / "ours.prof"
    opts = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "damp_percent": 0.01, "true_sequential": True}
    log("[profile] ours under cProfile")
    m = run_measured("ours profiled", OUR_PYTHON, TOOLS / "ours.py",
                     ["--model", str(model), "--calib", str(calib), "--out", str(work / "out"), "--options", json.dumps(opts), "--profile", str(prof)],
                     env=pinned_env(), log_dir=work / "logs")
    if not m.ok:
        return {"ok": False, "log": m.log_tail}
    text, rows = stage_table(str(prof))
    return {"ok": True, "quant_s": m.result["quant_seconds"], "stages": rows, "table": text, "top_self": top_functions(str(prof))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    res = run(a.quick)
    if not res["ok"]:
        print(res["log"])
        raise SystemExit(1)
    print(f"quantize() under cProfile: {res['quant_s']:.2f} s")
    print(res["table"])
    print(md_table(["function (self time)", "self s", "calls"], [[r["function"], r["self_s"], r["calls"]] for r in res["top_self"]]))


if __name__ == "__main__":
    main()
