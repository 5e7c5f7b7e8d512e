"""A real job's worker process: its memory per layer on a deep, wide model (goal: weights >= 2x peak RSS).

The embedded stack (`quantfarm run`, tests/support/stack.py) runs in a fresh home;
one GPTQ job (w4 g128, 32x256 calibration tokens, evaluation at its default) is
submitted over HTTP for a random fp32 Llama (default: width 1024, 24 layers, 1.23 GiB
of weights; ``--preset tinyllama``: TinyLlama-1.1B's geometry, 4.4 GiB). The worker's
/proc/PID/status is sampled every 0.5 s (RssAnon, RssFile, VmRSS, VmHWM) together with
the job's layer progress and stage, so a climb per layer shows as rising RssAnon from
one layer to the next.

    .venv/bin/python -m bench.worker_memory [--quick | --preset tinyllama] [--layers 24] [--hidden H --intermediate I
        --heads N --kv-heads K] [--samples 32 --seq-len 256] [--eval-windows W | --no-eval] [--threads 2]
        [--activations-ram-mib M] [--max-minutes M] [--write [--keep-rows]] [--json out.json]

``--activations-ram-mib`` sets the worker's ``activations_ram_bytes`` (default: the
setting's 64 MiB; a large value keeps every activation batch in RAM, as before
they could spill to the scratch disk). ``--max-minutes`` cancels the job after M
minutes and reports the layers it reached (on a busy machine a 24-layer job can
take most of an hour). ``--write`` puts the
table in RESULTS.md between its own markers; with ``--keep-rows`` the rows already
there for other models stay.

The worker's VmHWM includes the process's start-up (imports, Celery): that is what a
farm operator sizes a machine by.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from bench.common import CACHE, ROOT, md_table

PRESETS = {
    "wide": {"hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 16, "layers": 24},
    "tinyllama": {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "layers": 24},  # TinyLlama-1.1B
    "quick": {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 4, "layers": 4},
}
FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


def model(layers: int, width: dict) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.support.models import make_tiny_model, train_tokenizer

    tok = train_tokenizer(CACHE / "models" / "tokenizer")
    name = f"random-llama-h{width['hidden']}-i{width['intermediate']}-a{width['heads']}-kv{width['kv_heads']}-l{layers}"
    return make_tiny_model(CACHE / "models" / name, "llama", tokenizer_dir=tok, layers=layers, **width)


def proc_status(pid: int) -> dict[str, float]:
    """The memory lines of /proc/PID/status, in MiB."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in FIELDS:
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


class Sampler(threading.Thread):
    """Every ``every`` seconds: the worker's memory lines, the job's layers done and stage."""

    def __init__(self, stack, pid: int, job_id: str, every: float = 0.5):
        super().__init__(daemon=True)
        self.stack, self.pid, self.job_id, self.every = stack, pid, job_id, every
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(self.every):
            mem = proc_status(self.pid)
            try:
                job = self.stack.get(f"/v1/jobs/{self.job_id}").json()
            except Exception:  # noqa: BLE001 - a missed poll only costs one sample's label
                job = {}
            prog = job.get("progress") or {}
            self.samples.append({"t": round(time.monotonic() - t0, 1), "status": job.get("status"), "stage": job.get("stage"),
                                 "layers_done": prog.get("layers_done"), **mem})


def per_layer(samples: list[dict]) -> list[dict]:
    """The largest RssAnon seen while each layer count was current (None: before the first layer)."""
    rows: dict = {}
    for s in samples:
        if "RssAnon" not in s:
            continue
        key = (s["layers_done"], s["stage"]) if s["layers_done"] is not None else (None, s["stage"])
        r = rows.setdefault(key, {"layers_done": key[0], "stage": key[1], "rss_anon_max": 0.0, "rss_anon_min": s["RssAnon"],
                                  "vm_hwm": 0.0, "n": 0})
        r["rss_anon_max"] = max(r["rss_anon_max"], s["RssAnon"])
        r["rss_anon_min"] = min(r["rss_anon_min"], s["RssAnon"])
        r["vm_hwm"] = max(r["vm_hwm"], s["VmHWM"])
        r["n"] += 1
    return list(rows.values())


BEGIN, END = "<!-- worker_memory:begin -->", "<!-- worker_memory:end -->"


def run(layers: int, width: dict, log=print, env: dict | None = None, max_minutes: float | None = None,
        calib: dict | None = None, evaluation: dict | None = None, threads: int = 2, activations_ram_mib: int | None = None) -> dict:
    """One job; ``evaluation``: None keeps the spec's default, {"evaluate": False} turns it off,
    {"evaluation": {"max_windows": W}} bounds it."""
    from tests.support.stack import EmbeddedStack

    calib = calib or {"num_samples": 32, "seq_len": 256}
    src = model(layers, width)
    weights_mib = round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20, 1)
    home = CACHE / "runs" / "worker-memory" / f"home-{os.getpid()}"
    env = dict(env or {})
    if activations_ram_mib is not None:
        env["QUANTFARM_ACTIVATIONS_RAM_BYTES"] = str(activations_ram_mib * 2**20)
    stack = EmbeddedStack(home, QUANTFARM_TORCH_THREADS=str(threads), QUANTFARM_LOCAL_ROOTS=str(src.parent), **env).start()
    try:
        pid = stack.pid("worker")
        idle = proc_status(pid)
        log(f"[worker-memory] worker pid {pid} idle: {idle}; model {weights_mib} MiB")
        body = {"model": {"source": "local", "path": str(src)}, "method": "gptq",
                "options": {"bits": 4, "group_size": 128}, "calibration": {"dataset": "builtin:code", **calib},
                **(evaluation or {})}
        t0 = time.monotonic()
        job_id = stack.submit(body)
        sampler = Sampler(stack, pid, job_id)
        sampler.start()
        try:
            job = stack.wait(job_id, timeout=max_minutes * 60 if max_minutes else 7200)
        except TimeoutError:
            log(f"[worker-memory] {max_minutes} minutes: cancelling (the table reports the layers reached)")
            stack.post(f"/v1/jobs/{job_id}/cancel")
            job = stack.wait(job_id, timeout=1800)
        sampler.stop.set()
        sampler.join()
        wall = time.monotonic() - t0
        end = proc_status(pid)
    finally:
        stack.stop()
        shutil.rmtree(home, ignore_errors=True)
    samples = sampler.samples
    peak_anon = max((s.get("RssAnon", 0) for s in samples), default=0)
    hwm = max([s.get("VmHWM", 0) for s in samples] + [end.get("VmHWM", 0)])
    res = {"layers": layers, "width": width, "calibration": calib, "evaluation": evaluation, "threads": threads,
           "activations_ram_mib": activations_ram_mib,
           "weights_mib": weights_mib, "status": job["status"],
           "error": job.get("error"), "wall_s": round(wall, 1), "idle": idle, "end": end, "peak_rss_anon_mib": peak_anon,
           "vm_hwm_mib": hwm, "per_layer": per_layer(samples), "samples": samples, "load_avg": os.getloadavg(),
           "metrics": {k: (job.get("metrics") or {}).get(k) for k in ("quantize_seconds", "evaluate_seconds",
                                                                        "perplexity_before", "perplexity_after")}}
    res["layers_done"] = max((s["layers_done"] or 0 for s in samples), default=0)
    res["weights_over_peak"] = round(weights_mib / hwm, 2) if hwm else None
    res["goal_met"] = job["status"] == "succeeded" and bool(hwm) and weights_mib >= 2 * hwm
    return res


LATER = ("exporting", "evaluating", "uploading")


def loop_rows(res: dict) -> list[dict]:
    """The per-layer rows of the quantize loop (layers done >= 0, before export)."""
    return [r for r in res["per_layer"] if r["stage"] not in LATER and r["layers_done"] is not None]


def flatness(res: dict) -> dict:
    """Does the peak inside a layer climb with depth? Least-squares slope of each layer's max RssAnon
    (from the second layer on: the first also holds the embeddings' capture), its range, and the
    seconds per layer (between the samples where the count of layers done changed)."""
    rows = [r for r in loop_rows(res) if r["layers_done"] >= 1 and r["layers_done"] < res["layers"]]
    out: dict = {"n": len(rows)}
    if len(rows) >= 2:
        xs, ys = [r["layers_done"] for r in rows], [r["rss_anon_max"] for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        out.update(slope=round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 2) if var else 0.0,
                   lo=min(ys), hi=max(ys))
        floors = [r["rss_anon_min"] for r in rows if "rss_anon_min" in r]
        if floors:
            out.update(floor_lo=min(floors), floor_hi=max(floors))
    first: dict[int, float] = {}
    for smp in res["samples"]:
        if smp.get("layers_done") is not None and smp.get("stage") not in LATER:
            first.setdefault(smp["layers_done"], smp["t"])
    steps = sorted(first)
    secs = sorted(first[b] - first[a] for a, b in zip(steps, steps[1:]) if b == a + 1)
    if secs:
        out["median_layer_s"] = round(secs[len(secs) // 2], 1)
    return out


def layer_summary(res: dict) -> str:
    """RssAnon at a few layer counts of the quantize loop, then the later stages."""
    loop = loop_rows(res)
    picks = sorted({0, len(loop) // 4, len(loop) // 2, 3 * len(loop) // 4, len(loop) - 1}) if loop else []
    parts = [f"L{loop[i]['layers_done']}: {loop[i]['rss_anon_max']:.0f}" for i in picks if 0 <= i < len(loop)]
    for stage in LATER:
        vals = [r["rss_anon_max"] for r in res["per_layer"] if r["stage"] == stage]
        if vals:
            parts.append(f"{stage}: {max(vals):.0f}")
    return ", ".join(parts)


HEADER = ["model", "weights MiB", "calibration / evaluation", "activations in RAM", "job", "RssAnon MiB by layers done (max while current)",
          "flat? (layers 1..n-1)", "peak RssAnon MiB", "worker VmHWM MiB", "weights / VmHWM", "goal (>= 2)"]


def label(res: dict) -> str:
    w = res["width"]
    return f"Llama h{w['hidden']} i{w['intermediate']} a{w['heads']}/kv{w['kv_heads']} x{res['layers']} fp32"


def row(res: dict) -> list:
    cal, ev, fl = res["calibration"], res.get("evaluation"), flatness(res)
    evaluation = ("off" if ev.get("evaluate") is False else f"{ev['evaluation']['max_windows']} windows") if ev else "default (64 windows)"
    flat = (f"peaks {fl['lo']:.0f}–{fl['hi']:.0f}, slope {fl['slope']:+.1f} MiB/layer" if "slope" in fl else "—")
    if "floor_lo" in fl:
        flat += f"; floor {fl['floor_lo']:.0f}–{fl['floor_hi']:.0f}"
    per = f", {fl['median_layer_s']:.0f} s/layer median" if "median_layer_s" in fl else ""
    ram = res.get("activations_ram_mib")
    return [label(res), res["weights_mib"], f"{cal['num_samples']}×{cal['seq_len']} / {evaluation}",
            "all (before the spool)" if "activations_ram_mib" not in res else (f"≤ {ram} MiB" if ram is not None else "≤ 64 MiB (default)"),
            f"{res['status']} {res['wall_s']:.0f} s ({res['layers_done']}/{res['layers']} layers{per}; {res['threads']} threads)",
            layer_summary(res), flat, f"{res['peak_rss_anon_mib']:.0f}", f"{res['vm_hwm_mib']:.0f}", res["weights_over_peak"],
            "**met**" if res["goal_met"] else "NOT met"]


def table(res: dict, kept: list[str] | None = None) -> str:
    text = md_table(HEADER, [row(res)])
    return text + ("\n" + "\n".join(kept) if kept else "")


def kept_rows(res: dict) -> list[str]:
    """The rows of the section already in RESULTS.md for other models (``--keep-rows``)."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    if BEGIN not in text or END not in text:
        return []
    section = text[text.index(BEGIN):text.index(END)]
    return [ln for ln in section.splitlines() if ln.startswith("| Llama") and not ln.startswith(f"| {label(res)} |")
            and ln.count("|") == len(HEADER) + 1]


def every_layer(res: dict) -> str:
    """The largest RssAnon (and VmHWM) seen while each count of layers done was current, every layer."""
    return ", ".join(f"{r['layers_done']}: {r['rss_anon_max']:.0f}" for r in loop_rows(res))


def write(text: str, command: str, res: dict) -> None:
    from bench.common import write_section

    hwm = [f"{r['layers_done']}: {r['vm_hwm']:.0f}" for r in loop_rows(res)]
    body = "\n".join([BEGIN, "## Memory of a real job's worker process, per layer", "",
                      f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
                      f"{res['load_avg_start'][0]:.1f} at the start, {res['load_avg'][0]:.1f} at the end "
                      "(2 cores shared with other work: the times are not comparable, the memory is).", "", text, "",
                      f"First row, every layer (layers done: largest RssAnon MiB while current): {every_layer(res)}.", "",
                      f"VmHWM MiB by layers done: {', '.join(hwm[::4])}.", "", END])
    write_section(body, BEGIN, END)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="width 256, 4 layers: checks the harness")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="wide", help="a model geometry (default: wide)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int, help="override the width (default intermediate 2.75x, heads = width / 64)")
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration (and evaluation window) length")
    ev = ap.add_mutually_exclusive_group()
    ev.add_argument("--eval-windows", type=int, help="evaluation.max_windows (default: the spec's)")
    ev.add_argument("--no-eval", action="store_true", help="evaluate: false")
    ap.add_argument("--threads", type=int, default=2, help="QUANTFARM_TORCH_THREADS for the worker")
    ap.add_argument("--activations-ram-mib", type=int, help="the worker's activations_ram_bytes in MiB (default: the setting's)")
    ap.add_argument("--max-minutes", type=float, help="cancel the job after this long and report the layers reached")
    ap.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    ap.add_argument("--keep-rows", action="store_true", help="with --write: keep the section's rows for other models")
    ap.add_argument("--json", help="save the whole result (every sample) here")
    ap.add_argument("--from-json", help="render (and with --write, record) a saved result instead of running")
    a = ap.parse_args()
    if a.from_json:
        return report(json.loads(Path(a.from_json).read_text()), a)
    geo = dict(PRESETS["quick" if a.quick else a.preset])
    if a.hidden:
        geo.update(hidden=a.hidden, intermediate=a.hidden * 11 // 4, heads=a.hidden // 64, kv_heads=a.hidden // 64)
    for key in ("layers", "intermediate", "heads", "kv_heads"):
        if getattr(a, key) is not None:
            geo[key] = getattr(a, key)
    layers = geo.pop("layers")
    evaluation = {"evaluate": False} if a.no_eval else ({"evaluation": {"max_windows": a.eval_windows}} if a.eval_windows else None)
    start_load = os.getloadavg()
    print(f"load average at start: {start_load}", flush=True)
    res = run(layers, geo, max_minutes=a.max_minutes, calib={"num_samples": a.samples, "seq_len": a.seq_len},
              evaluation=evaluation, threads=a.threads, activations_ram_mib=a.activations_ram_mib)
    res["load_avg_start"] = start_load
    res["flatness"] = flatness(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    report(res, a)
    print(f"load average at end: {os.getloadavg()}")


def command_for(res: dict) -> str:
    """The command that runs ``res``'s configuration (every parameter spelled out)."""
    w, cal, ev = res["width"], res["calibration"], res.get("evaluation")
    evaluation = "" if not ev else (" --no-eval" if ev.get("evaluate") is False else f" --eval-windows {ev['evaluation']['max_windows']}")
    return (f"python -m bench.worker_memory --layers {res['layers']} --hidden {w['hidden']} --intermediate {w['intermediate']} "
            f"--heads {w['heads']} --kv-heads {w['kv_heads']} --samples {cal['num_samples']} --seq-len {cal['seq_len']}"
            f"{evaluation} --threads {res['threads']}"
            + (f" --activations-ram-mib {res['activations_ram_mib']}" if res.get("activations_ram_mib") is not None else ""))


def report(res: dict, a) -> None:
    text = table(res, kept_rows(res) if a.keep_rows else None)
    print(text)
    if a.write:
        write(text, command_for(res) + " --write" + (" --keep-rows" if a.keep_rows else ""), res)
    for r in res["per_layer"]:
        print(r)
    print(f"flatness: {flatness(res)}")


if __name__ == "__main__":
    main()
