"""Run every benchmark and rewrite bench/RESULTS.md (``make bench``).

    .venv/bin/python -m bench.run_all [--quick] [--repeats N] [--only gptq,awq,memory,hessian] [--no-write]

All tools run in this one invocation on this machine, one after another (never
in parallel), with the same thread count. The peers' venvs are created on first
use (bench/.cache/venvs; several minutes), and so is the trained bench model
(bench/.cache/models; several minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import (
    awq_peers,
    formats,
    gptq_peers,
    memory_scaling,
    profile_ours,
    shared_hessian,
    venvs,
)
from bench.common import BENCH, CACHE, ROOT, THREADS, machine
from bench.compare import goals_text, table

SECTIONS = ("hessian", "gptq", "gptq3", "profile", "awq", "memory", "formats")


def keep_own_sections(text: str) -> str:
    """Carry over every section another bench writes itself (``<!-- name:begin -->`` ... ``<!-- name:end -->``:
    bench/api_load.py, bench/soak.py, bench/worker_memory.py) into the new RESULTS.md."""
    import re

    path = BENCH / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", old, flags=re.S):
        if m.group(0).split("\n", 1)[0] not in text:
            text = text.rstrip("\n") + "\n\n" + m.group(0) + "\n"
    return text


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def command_line(argv: list[str]) -> str:
    py = Path(sys.executable)
    try:
        py = py.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([str(py), "-m", "bench.run_all", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, numbers mean nothing")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool in the w4 GPTQ and AWQ benches (median reported)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--no-peer-memory", action="store_true", help="memory bench: ours only")
    ap.add_argument("--no-write", action="store_true", help="print, do not rewrite RESULTS.md")
    ap.add_argument("--render", metavar="JSON", help="only re-render RESULTS.md from a saved run (bench/.cache/results/run-*.json)")
    a = ap.parse_args(argv)
    if a.render:
        text = render(json.loads(Path(a.render).read_text()))
        (BENCH / "RESULTS.md").write_text(keep_own_sections(text))
        print(text)
        return 0
    only = [s for s in a.only.split(",") if s]
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(THREADS))

    t0 = time.perf_counter()
    info = machine()
    log(f"machine: {info['nproc']} cores, {info['cpu']}, torch {info['torch']}, load {info['load_avg']}")
    if info["load_avg"][0] > 1.5:
        log("WARNING: load average above 1.5; other work on this machine will skew the timings")
    for name in venvs.PEERS:
        if (name == "llmc" and {"gptq", "gptq3"} & set(only)) or (name == "autoawq" and "awq" in only):
            venvs.ensure(name, log)

    results: dict = {"machine": info, "command": command_line(argv), "quick": a.quick}
    if "hessian" in only:
        log("shared Hessian bench")
        results["hessian"] = shared_hessian.run(a.quick)
    if "gptq" in only:
        log("GPTQ peers bench")
        results["gptq"] = gptq_peers.run(a.quick, a.repeats, log)
    if "gptq3" in only:
        log("GPTQ peers bench, 3-bit (quality stress: at 4 bits this model loses almost nothing)")
        results["gptq3"] = gptq_peers.run(a.quick, 1, log, bits=3, variants=False)
    if "profile" in only:
        log("profile of our GPTQ")
        results["profile"] = profile_ours.run(a.quick, log)
    if "awq" in only:
        log("AWQ peers bench")
        results["awq"] = awq_peers.run(a.quick, a.repeats, log)
    if "memory" in only:
        log("memory scaling bench")
        results["memory"] = memory_scaling.run(a.quick, not a.no_peer_memory, log)
    if "formats" in only:
        log("output formats bench")
        results["formats"] = formats.run(a.quick, log)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["load_avg_end"] = os.getloadavg()

    text = render(results)
    print(text)
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=1, default=str))
    if not a.no_write:
        (BENCH / "RESULTS.md").write_text(keep_own_sections(text))
        log("wrote bench/RESULTS.md")
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_avg"])
    load_end = ", ".join(f"{x:.2f}" for x in r["load_avg_end"])
    parts = [
        "# Benchmark results",
        "",
        "Written by `make bench`; do not edit by hand. " + ("**QUICK RUN: tiny sizes, the numbers mean nothing.**" if r["quick"] else ""),
        "",
        f"- Command: `{r['command']}` (`make bench` runs `.venv/bin/python -m bench.run_all`)",
        f"- Date: {m['date']}; total {r['seconds'] / 60:.1f} min",
        (f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}; "
        f"load average at start {load}, at end {load_end}"),
        (f"- Every tool ran in this same run on this same machine, one process at a time, with {m['threads']} torch/OpenMP threads "
        "(`torch.set_num_threads`, `OMP_NUM_THREADS`, `GPTQMODEL_CPU_WORKERS`), CPU only."),
        "",
    ]
    for key in ("gptq", "gptq3"):
        if key not in r:
            continue
        g = r[key]
        c = g["config"]
        parts += [
            f"## GPTQ {c['bits']}-bit: ours vs GPTQModel vs llm-compressor" + (" (quality stress)" if key == "gptq3" else ""),
            "",
            (f"Model `{c['model']}` (trained on Python stdlib text by tests/support/trained.py). Config: w{c['bits']}, group {c['group_size']}, "
            f"sym, no act-order (GPTQModel's `act_group_aware` off as well), damp {c['damp']}, fp32 compute. Calibration: the same "
            f"{c['calib_windows']} windows × {c['seq_len']} tokens (one .pt, built by workers.engine.calibration) for every tool, "
            f"{c['batch_windows']} windows per forward. Perplexity on {c['eval_windows']} held-out windows (stdlib files never used "
            f"for calibration). Times are the median of {c['repeats']} interleaved run(s). Ratios are ours/peer "
            "(< 1: ours is lower, i.e. better). The reference rows are not peers and get no ratios."),
            "",
            table(g),
            "",
            goals_text(g["goals"]),
            "",
        ]
    if r.get("profile", {}).get("ok"):
        p = r["profile"]
        parts += [
            "## Where our GPTQ time goes",
            "",
            (f"cProfile of one w4 `quantize()` on the GPTQ bench's model and windows ({p['quant_s']:.2f} s under the profiler), "
            "cumulative seconds per engine stage. With `true_sequential` the layer walk stops each batch as soon as "
            "the group being solved has its inputs and serves finished sub-modules (self_attn after o_proj, mlp after "
            "down_proj) from their stored inputs, so all the passes of one layer cost about one forward; the final "
            "pass, which yields the next layer's inputs, only adds norms and residuals."),
            "",
            p["table"],
            "",
        ]
    if "awq" in r:
        g = r["awq"]
        c = g["config"]
        parts += [
            "## AWQ: ours vs AutoAWQ vs GPTQModel AWQ",
            "",
            (f"Same model, windows and threads. Config: w4, group {c['group_size']}, zero point, GEMM packing, fp32 compute "
            "(GPTQModel's AWQ packer accepts only fp16/bf16 models, so it runs in bf16, its own CPU default). "
            f"Times are the median of {c['repeats']} interleaved runs. \"ours\" is the default coarse-to-fine α search "
            "(11 of AutoAWQ's 20 grid points); \"ours, full α grid\" scores all 20, as AutoAWQ does."),
            "",
            table(g),
            "",
            goals_text(g["goals"]),
            "",
        ]
    if "memory" in r:
        mm = r["memory"]
        w = mm["width"]
        parts += [
            "## Memory: peak RSS vs depth",
            "",
            (f"GPTQ w4 g128 on random Llamas of hidden {w['hidden']}, intermediate {w['intermediate']} at two depths; "
            f"{mm['calib_windows']} calibration windows × {mm['seq_len']} tokens. Peak RSS of the job process (its VmHWM). "
            "Goal: ours, deep/shallow ≤ 1.2."),
            "",
            memory_scaling.table(mm),
            "",
            f"Goal (ours ≤ 1.2): {'**met**' if mm['goal_met'] else '**NOT met**'}.",
            "",
        ]
    if "hessian" in r:
        parts += [
            "## Shared Hessian: one factor and one stacked solve vs one per linear",
            "",
            ("`GPTQMethod.solve_group` (one Hessian, one factor, one column sweep over the stacked rows) vs `factor_hessian` + "
            "`gptq_quantize` per weight, on the same weights and inputs; the codes, scales and zeros are asserted identical. "
            "Median of the runs; ratio < 1 means shared is faster. \"incl. Hessian\" adds the accumulation (once vs once per linear)."),
            "",
            shared_hessian.table(r["hessian"]),
            "",
        ]
    if "formats" in r:
        f = r["formats"]
        parts += [
            "## Output formats: size and perplexity",
            "",
            (f"Model `{f['model']}`. Each method ran once through the engine (as a worker runs a job) and wrote every format "
             "listed for it from that one quantization; each folder was then loaded by its own client in a fresh process "
             "(gptq: transformers + gptqmodel `gptq_torch`; awq: transformers + gptqmodel; compressed-tensors: transformers + "
             "compressed-tensors, decompressed; gguf: transformers' GGUF loader; bitsandbytes and LoftQ: transformers + "
             f"bitsandbytes, LoftQ with its PEFT adapter) and scored on {f['eval_windows']} held-out windows. Size counts the "
             "weight files (.safetensors, .gguf). FP8 is scored with its weights decompressed (no activation rounding)."),
            "",
            formats.table(f),
            "",
        ]
    parts += [METHOD_NOTES]
    return "\n".join(parts)


METHOD_NOTES = """## How it is measured

- **Processes.** Each quantization runs in a fresh process (`bench/tools/*.py`), ours and GPTQModel in the project venv,
  llm-compressor and AutoAWQ in their own venvs under `bench/.cache/venvs` (each pins a transformers that differs from ours;
  requirements in `bench/requirements/`). Tools run one at a time, interleaved over the repeats.
- **quantize s** is measured inside the process from after the imports to the saved output: load the model, run the
  calibration, solve, pack and write the checkpoint (ours also writes its per-layer resume checkpoints). transformers'
  lazily imported modules are imported before the clock starts in every tool. **process wall s** is the whole process
  as seen by the parent, imports included.
- **peak RSS** is the quantizing process's own high-water mark (`VmHWM` from /proc/self/status, read by the tool as
  it exits). Not `ru_maxrss` from `wait4`/`RUSAGE_CHILDREN`: Linux carries the RSS high-water mark across fork+exec,
  so those report at least the parent's RSS at spawn time (the bench driver's ~550 MiB), which flattened every small
  value. **tree RSS** is a psutil sample of the process and its children every 20 ms, as a cross-check (none of the
  tools keeps child processes here). Raw numbers, including `ru_maxrss`, are in the JSON under bench/.cache/results.
- **Perplexity.** One evaluator (`bench/tools/eval_ppl.py`, exp of the mean next-token NLL over the held-out windows) in
  our venv scores every output. GPTQ checkpoints load through transformers + `GPTQConfig(backend="gptq_torch")` in fp32
  (the exact dequantization; the default CPU kernel uses bf16 scales). AWQ checkpoints load through transformers +
  gptqmodel's CPU AWQ kernel in fp32. llm-compressor writes compressed-tensors, which our transformers cannot read with
  its compressed-tensors version pinned elsewhere, so `bench/tools/densify.py` loads it in llm-compressor's own venv
  (transformers + compressed-tensors decompression), re-applies its quantizer to get the exact dequantized weights, and
  saves them as plain fp32; the evaluator then scores those. The perplexity computed inside llm-compressor's venv is kept
  as a cross-check (`perplexity_own_venv` in the JSON) and matches. This keeps one transformers version and one forward
  for every tool, so differences come from the weights alone.
"""


if __name__ == "__main__":
    sys.exit(main())
