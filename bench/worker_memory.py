"""A real job's worker process: its memory per layer on a deep, wide model (goal: weights >= 2x peak RSS).

The embedded stack (`quantfarm run`, tests/support/stack.py) runs in a fresh home;
one GPTQ job (w4 g128, 32x256 calibration tokens, evaluation at its default) is
submitted over HTTP for a random Llama of width 1024 and 24 layers (fp32, 1.23 GiB
of weights). The worker's /proc/PID/status is sampled every 0.5 s (RssAnon, RssFile,
VmRSS, VmHWM) together with the job's layer progress and stage, so a climb per layer
shows as rising RssAnon from one layer to the next.

    .venv/bin/python -m bench.worker_memory [--quick] [--layers 24] [--hidden 1024] [--max-minutes M] [--write] [--json out.json]

``--max-minutes`` cancels the job after M minutes and reports the layers it reached
(on a busy machine a 24-layer job can take most of an hour). ``--write`` puts the
table in RESULTS.md between its own markers.

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

WIDE = {"hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 16}
QUICK = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 4}
CALIB = {"num_samples": 32, "seq_len": 256}
FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


def model(layers: int, width: dict) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.support.models import make_tiny_model, train_tokenizer

    tok = train_tokenizer(CACHE / "models" / "tokenizer")
    name = f"random-llama-h{width['hidden']}-i{width['intermediate']}-l{layers}"
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
        r = rows.setdefault(key, {"layers_done": key[0], "stage": key[1], "rss_anon_max": 0.0, "vm_hwm": 0.0, "n": 0})
        r["rss_anon_max"] = max(r["rss_anon_max"], s["RssAnon"])
        r["vm_hwm"] = max(r["vm_hwm"], s["VmHWM"])
        r["n"] += 1
    return list(rows.values())


BEGIN, END = "<!-- worker_memory:begin -->", "<!-- worker_memory:end -->"


def run(layers: int, width: dict, log=print, env: dict | None = None, max_minutes: float | None = None) -> dict:
    from tests.support.stack import EmbeddedStack

    src = model(layers, width)
    weights_mib = round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20, 1)
    home = CACHE / "runs" / "worker-memory" / f"home-{os.getpid()}"
    stack = EmbeddedStack(home, QUANTFARM_TORCH_THREADS="2", QUANTFARM_LOCAL_ROOTS=str(src.parent), **(env or {})).start()
    try:
        pid = stack.pid("worker")
        idle = proc_status(pid)
        log(f"[worker-memory] worker pid {pid} idle: {idle}; model {weights_mib} MiB")
        body = {"model": {"source": "local", "path": str(src)}, "method": "gptq",
                "options": {"bits": 4, "group_size": 128}, "calibration": {"dataset": "builtin:code", **CALIB}}
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
    res = {"layers": layers, "width": width, "calibration": CALIB, "weights_mib": weights_mib, "status": job["status"],
           "error": job.get("error"), "wall_s": round(wall, 1), "idle": idle, "end": end, "peak_rss_anon_mib": peak_anon,
           "vm_hwm_mib": hwm, "per_layer": per_layer(samples), "samples": samples, "load_avg": os.getloadavg(),
           "metrics": {k: (job.get("metrics") or {}).get(k) for k in ("quantize_seconds", "perplexity_before", "perplexity_after")}}
    res["layers_done"] = max((s["layers_done"] or 0 for s in samples), default=0)
    res["weights_over_peak"] = round(weights_mib / hwm, 2) if hwm else None
    res["goal_met"] = job["status"] == "succeeded" and bool(hwm) and weights_mib >= 2 * hwm
    return res


def layer_summary(res: dict) -> str:
    """RssAnon at a few layer counts of the quantize loop, then the later stages."""
    loop = [r for r in res["per_layer"] if r["stage"] not in ("exporting", "evaluating", "uploading") and r["layers_done"] is not None]
    picks = sorted({0, len(loop) // 4, len(loop) // 2, 3 * len(loop) // 4, len(loop) - 1}) if loop else []
    parts = [f"L{loop[i]['layers_done']}: {loop[i]['rss_anon_max']:.0f}" for i in picks if 0 <= i < len(loop)]
    for stage in ("exporting", "evaluating", "uploading"):
        vals = [r["rss_anon_max"] for r in res["per_layer"] if r["stage"] == stage]
        if vals:
            parts.append(f"{stage}: {max(vals):.0f}")
    return ", ".join(parts)


def table(res: dict) -> str:
    w = res["width"]
    return md_table(
        ["model", "weights MiB", "job", "RssAnon MiB by layers done (max while current)", "peak RssAnon MiB", "worker VmHWM MiB",
         "weights / VmHWM", "goal (>= 2)"],
        [[f"Llama h{w['hidden']} i{w['intermediate']} x{res['layers']} fp32", res["weights_mib"], f"{res['status']} {res['wall_s']:.0f} s ({res['layers_done']}/{res['layers']} layers)",
          layer_summary(res), f"{res['peak_rss_anon_mib']:.0f}", f"{res['vm_hwm_mib']:.0f}", res["weights_over_peak"],
          "**met**" if res["goal_met"] else "NOT met"]])


def write(text: str, command: str, res: dict) -> None:
    from bench.common import write_section

    body = "\n".join([BEGIN, "## Memory of a real job's worker process, per layer", "",
                      f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {res['load_avg'][0]:.1f} "
                      "(2 cores shared with other work: the times are not comparable, the memory is).", "", text, "", END])
    write_section(body, BEGIN, END)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="width 256, 4 layers: checks the harness")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, help="override the width (intermediate = 2.75x)")
    ap.add_argument("--max-minutes", type=float, help="cancel the job after this long and report the layers reached")
    ap.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    ap.add_argument("--json")
    a = ap.parse_args()
    width = dict(QUICK if a.quick else WIDE)
    if a.hidden:
        width = {"hidden": a.hidden, "intermediate": a.hidden * 11 // 4, "heads": a.hidden // 64, "kv_heads": a.hidden // 64}
    layers = 4 if a.quick else a.layers
    print(f"load average at start: {os.getloadavg()}")
    res = run(layers, width, max_minutes=a.max_minutes)
    print(table(res))
    if a.write:
        write(table(res), "python -m bench.worker_memory " + " ".join(sys.argv[1:]), res)
    for r in res["per_layer"]:
        print(r)
    print(f"load average at end: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
