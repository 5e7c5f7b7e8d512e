"""Ours-vs-peers plumbing shared by the GPTQ and AWQ benchmarks."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    OUR_PYTHON,
    TOOLS,
    Measured,
    fmt,
    md_table,
    pinned_env,
    ratio,
    run_measured,
    venv_python,
)


@dataclass
class Tool:
    """One quantizer run: which python, which script, its args, how to score its output."""

    python: Path
    script: Path
    args: list[str]
    out: Path
    kind: str  # how eval reads the output: gptq | awq | dense | compressed-tensors
    context: bool = False  # a reference row (e.g. RTN), not a peer: no ratios, not in the goals

    def available(self) -> bool:
        return self.python.is_file()


def run_tools(tools: dict[str, Tool], repeats: int, log_dir: Path, tag: str, log=print, timeout: float = 1800) -> dict[str, list[Measured]]:
    """Run every tool ``repeats`` times, interleaved so a burst of load hits all alike."""
    runs: dict[str, list[Measured]] = {k: [] for k in tools}
    for r in range(repeats):
        for label, t in tools.items():
            if (t.context and r > 0) or not t.available():
                continue
            log(f"[{tag}] {label} run {r + 1}/{repeats}")
            runs[label].append(run_measured(f"{label} {r}", t.python, t.script, [*t.args, "--out", str(t.out)], env=pinned_env(), log_dir=log_dir,
                                             timeout=timeout))
    return runs


def summarize(runs: list[Measured]) -> dict:
    ok = [m for m in runs if m.ok]
    if not ok:
        return {"ok": False, "error": "not run" if not runs else "failed", "log": runs[-1].log_tail if runs else ""}
    def med(xs):
        return round(statistics.median(xs), 2)

    return {
        "ok": True, "runs": len(ok),
        "quant_s": med([m.result["quant_seconds"] for m in ok]), "wall_s": med([m.wall_s for m in ok]),
        "import_s": med([m.result["import_seconds"] for m in ok]), "cpu_s": med([m.cpu_s for m in ok]),
        "quant_cpu_s": med([m.result.get("quant_cpu_seconds", 0.0) for m in ok]),
        "peak_rss_mb": med([m.peak_rss_mb for m in ok]), "sampled_rss_mb": med([m.sampled_rss_mb for m in ok]),
        "ru_maxrss_mb": med([m.ru_maxrss_mb for m in ok]),
        "quant_s_all": [m.result["quant_seconds"] for m in ok], "wall_s_all": [m.wall_s for m in ok],
        "detail": ok[-1].result,
    }


def evaluate(label: str, t: Tool, held: Path, log_dir: Path, densify_python: Path | None = None) -> dict:
    """Perplexity of a tool's output, scored in our venv; compressed formats are densified first in the tool's venv."""
    env = pinned_env()
    model, kind = t.out, t.kind
    extra = {}
    if kind == "compressed-tensors":
        dense = t.out.parent / (t.out.name + ".dense")
        d = run_measured(f"densify {label}", densify_python or t.python, TOOLS / "densify.py",
                         ["--model", str(t.out), "--out", str(dense), "--eval", str(held)], env=env, log_dir=log_dir)
        if not d.ok:
            return {"error": "densify failed", "log": d.log_tail}
        model, kind, extra = dense, "dense", {"perplexity_own_venv": d.result.get("perplexity")}
    e = run_measured(f"eval {label}", OUR_PYTHON, TOOLS / "eval_ppl.py", ["--model", str(model), "--eval", str(held), "--kind", kind],
                     env=env, log_dir=log_dir)
    return {**e.result, **extra} if e.ok else {"error": "eval failed", "log": e.log_tail}


def evaluate_all(tools: dict[str, Tool], summaries: dict[str, dict], source: Path, held: Path, log_dir: Path) -> float | None:
    """Fill each summary's perplexity; return the unquantized model's."""
    base = run_measured("eval fp32", OUR_PYTHON, TOOLS / "eval_ppl.py", ["--model", str(source), "--eval", str(held), "--kind", "dense"],
                        env=pinned_env(), log_dir=log_dir)
    for label, s in summaries.items():
        if s.get("ok"):
            s["eval"] = evaluate(label, tools[label], held, log_dir)
            s["perplexity"] = s["eval"].get("perplexity")
    return base.result.get("perplexity")


def goals(summaries: dict[str, dict]) -> dict:
    """The issue's goals: perplexity <= every peer's, time <= 0.5x the fastest peer's."""
    ours = summaries.get("ours", {})
    peers = {k: v for k, v in summaries.items() if k != "ours" and not v.get("context") and v.get("ok")}
    missing = [k for k, v in summaries.items() if k != "ours" and not v.get("context") and not v.get("ok")]
    if not ours.get("ok") or not peers or missing:
        # Judged against the peers that ran, a missing one (a venv not made yet, a crash) could turn NOT met into met.
        why = "ours did not run" if not ours.get("ok") else f"a peer did not run ({', '.join(missing)})" if missing else "no peer ran"
        return {"evaluated": False, "why": why}
    fastest = min(peers, key=lambda k: peers[k]["quant_s"])
    fastest_wall = min(peers, key=lambda k: peers[k]["wall_s"])
    have_ppl = ours.get("perplexity") is not None and all(p.get("perplexity") is not None for p in peers.values())
    return {
        "evaluated": True,
        "perplexity_le_every_peer": have_ppl and all(ours["perplexity"] <= p["perplexity"] for p in peers.values()),
        "fastest_peer_quant": fastest, "quant_ratio_vs_fastest": round(ours["quant_s"] / peers[fastest]["quant_s"], 3),
        "quant_time_le_half_fastest": ours["quant_s"] <= 0.5 * peers[fastest]["quant_s"],
        "fastest_peer_wall": fastest_wall, "wall_ratio_vs_fastest": round(ours["wall_s"] / peers[fastest_wall]["wall_s"], 3),
        "wall_time_le_half_fastest": ours["wall_s"] <= 0.5 * peers[fastest_wall]["wall_s"],
    }


def table(result: dict) -> str:
    t = result["tools"]
    ours = t.get("ours", {})
    blank = [""] * 10
    base = result.get("fp32_perplexity")
    rows = [["unquantized (fp32)", fmt(base, 3), "0", *blank]]
    for label, s in t.items():
        if not s.get("ok"):
            rows.append([label, s.get("error", "FAILED").upper(), *blank])
            continue
        me = label == "ours" or s.get("context")
        def r(a, b, nd=2, me=me):
            return "—" if me else ratio(a, b, nd)

        ppl = s.get("perplexity")
        delta = f"{ppl - base:+.3f}" if ppl is not None and base is not None else "—"
        rows.append([
            label, fmt(ppl, 3), delta, fmt(s["quant_s"]), fmt(s["wall_s"]), fmt(s["peak_rss_mb"], 0), fmt(s["sampled_rss_mb"], 0),
            r(ours.get("perplexity"), ppl, 4), r(ours.get("quant_s"), s["quant_s"]),
            r(ours.get("wall_s"), s["wall_s"]), r(ours.get("peak_rss_mb"), s["peak_rss_mb"]),
            ", ".join(f"{k} {v}" for k, v in s["detail"].get("versions", {}).items() if k != "torch"),
        ])
    headers = ["tool", "perplexity", "Δ vs fp32", "quantize s", "process wall s", "peak RSS MiB", "tree RSS MiB", "ppl ours/peer", "quantize ours/peer",
               "wall ours/peer", "RSS ours/peer", "versions"]
    return md_table(headers, rows)


def goals_text(g: dict) -> str:
    if not g.get("evaluated"):
        return f"Goals not evaluated: {g.get('why', '')}."
    def yn(b):
        return "**met**" if b else "**NOT met**"

    return (
        f"- perplexity ≤ every peer: {yn(g['perplexity_le_every_peer'])}\n"
        f"- quantize time ≤ 0.5× the fastest peer ({g['fastest_peer_quant']}): {yn(g['quant_time_le_half_fastest'])} "
        f"(ours/fastest = {g['quant_ratio_vs_fastest']:.2f})\n"
        f"- whole-process wall ≤ 0.5× the fastest peer ({g['fastest_peer_wall']}): {yn(g['wall_time_le_half_fastest'])} "
        f"(ours/fastest = {g['wall_ratio_vs_fastest']:.2f})"
    )


__all__ = ["OUR_PYTHON", "TOOLS", "Tool", "evaluate_all", "goals", "goals_text", "run_tools", "summarize", "table", "venv_python"]
