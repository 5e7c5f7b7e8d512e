"""Peak RSS of a GPTQ job on same-width models of 8 and 32 layers (goal: ratio <= 1.2).

Our engine streams one decoder layer at a time, so its peak should not grow
with depth. Each job runs in its own process (peak RSS from wait4); the
models have random weights (memory does not care what the weights learnt).
GPTQModel runs on the same models for comparison unless --no-peer. (The
engine hands freed layer buffers back to the OS after every layer; without
that, glibc's heap kept them and RSS crept up with depth: ratio 1.43.)

    .venv/bin/python -m bench.memory_scaling [--quick] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import (
    CACHE,
    OUR_PYTHON,
    ROOT,
    TOOLS,
    fmt,
    md_table,
    pinned_env,
    ratio,
    run_measured,
)
from bench.data import SEQ_LEN

WIDTH = {"hidden": 512, "intermediate": 1536, "heads": 8, "kv_heads": 8}
QUICK_WIDTH = {"hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 4}
DEPTHS = (8, 32)
CALIB = 16  # windows of SEQ_LEN tokens: activations stay small next to one layer


def _model(layers: int, width: dict) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.support.models import make_tiny_model, train_tokenizer

    tok = train_tokenizer(CACHE / "models" / "tokenizer")
    name = f"random-llama-h{width['hidden']}-i{width['intermediate']}-l{layers}"
    return make_tiny_model(CACHE / "models" / name, "llama", tokenizer_dir=tok, layers=layers, **width)


def _calib(model_dir: Path, n: int) -> Path:
    from bench.data import windows

    calib, _held = windows(model_dir, num_samples=n, seq_len=SEQ_LEN, eval_windows=1)
    return calib


def _size_mb(d: Path) -> float:
    return round(sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**20, 1)


def run(quick: bool = False, peer: bool = True, log=print) -> dict:
    """Quantize the shallow and the deep model with each tool; return peak RSS per depth and the ratios."""
    width = QUICK_WIDTH if quick else WIDTH
    depths = (2, 8) if quick else DEPTHS
    work = CACHE / "runs" / "memory"
    opts = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "damp_percent": 0.01}
    gm_opts = {**opts, "act_group_aware": False}
    rows = []
    for layers in depths:
        model = _model(layers, width)
        calib = _calib(model, CALIB)
        row = {"layers": layers, "model_mb": _size_mb(model)}
        log(f"[memory] ours, {layers} layers")
        m = run_measured(f"ours l{layers}", OUR_PYTHON, TOOLS / "ours.py",
                         ["--model", str(model), "--calib", str(calib), "--out", str(work / f"ours-l{layers}"), "--options", json.dumps(opts)],
                         env=pinned_env(), log_dir=work / "logs")
        row["ours"] = {"ok": m.ok, "peak_rss_mb": m.peak_rss_mb, "sampled_rss_mb": m.sampled_rss_mb, "quant_s": m.result.get("quant_seconds"), "wall_s": m.wall_s}
        if peer:
            log(f"[memory] gptqmodel, {layers} layers")
            g = run_measured(f"gptqmodel l{layers}", OUR_PYTHON, TOOLS / "gptqmodel_quant.py",
                             ["--model", str(model), "--calib", str(calib), "--out", str(work / f"gptqmodel-l{layers}"), "--options", json.dumps(gm_opts),
                              "--batch-size", "32"], env=pinned_env(), log_dir=work / "logs")
            row["gptqmodel"] = {"ok": g.ok, "peak_rss_mb": g.peak_rss_mb, "sampled_rss_mb": g.sampled_rss_mb, "quant_s": g.result.get("quant_seconds"), "wall_s": g.wall_s}
        rows.append(row)
    res = {"width": width, "calib_windows": CALIB, "seq_len": SEQ_LEN, "rows": rows}
    tools = ["ours"] + (["gptqmodel"] if peer else [])
    res["ratios"] = {}
    for t in tools:
        a, b = rows[0].get(t, {}), rows[-1].get(t, {})
        if a.get("ok") and b.get("ok"):
            res["ratios"][t] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
    res["goal_met"] = res["ratios"].get("ours") is not None and res["ratios"]["ours"] <= 1.2
    return res


def table(res: dict) -> str:
    tools = [t for t in ("ours", "gptqmodel") if t in res["rows"][0]]
    headers = ["layers", "weights MiB"]
    for t in tools:
        headers += [f"{t} peak RSS MiB", f"{t} quantize s"]
    rows = []
    for r in res["rows"]:
        line = [r["layers"], r["model_mb"]]
        for t in tools:
            s = r[t]
            line += [fmt(s["peak_rss_mb"], 0) if s["ok"] else "FAILED", fmt(s["quant_s"])]
        rows.append(line)
    a, b = res["rows"][0], res["rows"][-1]
    line = [f"ratio {b['layers']}/{a['layers']}", ratio(b["model_mb"], a["model_mb"])]
    for t in tools:
        line += [f"**{res['ratios'][t]:.2f}**" if t in res["ratios"] else "n/a", ratio(b[t]["quant_s"], a[t]["quant_s"])]
    rows.append(line)
    return md_table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="skip GPTQModel")
    ap.add_argument("--json")
    a = ap.parse_args()
    res = run(a.quick, not a.no_peer)
    print(table(res))
    print("goal (ours 32/8 peak RSS <= 1.2):", "met" if res["goal_met"] else "NOT met")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
