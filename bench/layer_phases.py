"""Where a layer's memory peak is: the engine's GPTQ job (no stack) with each phase's exact peak.

At every phase boundary (loading a layer, each walk over its batches, each group's
solve, the rest of a group's work, the final pass, apply, trim, checkpoint) the
process's peak RSS is read and reset (``/proc/self/clear_refs``: VmHWM, which counts
file pages such as the mmapped safetensors and the libraries, too), so each phase's
figure is its own peak; RssAnon is sampled every 20 ms under the same labels. The
job runs as a worker's does: activations beyond ``--ram-mib`` spill to a scratch
folder; ``--in-thread`` runs it on a thread of its own, as a worker's poller does.
Stops after ``--run-layers`` layers (a layer's peak does not depend on depth).

    .venv/bin/python -m bench.layer_phases [--layers 24] [--run-layers 2] [--samples 128 --seq-len 512]
        [--hidden 1024 --intermediate 2816] [--ram-mib 64] [--threads 1] [--in-thread] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) // 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """Peak VmHWM (exact, reset at each boundary) and sampled RssAnon per ``L<layer>:<phase>`` label."""

    def __init__(self) -> None:
        self.stack, self.layer, self.peaks = ["other"], -1, {}

    def label(self) -> str:
        return f"L{self.layer}:{self.stack[-1]}"

    def note(self, label: str, hwm: int | None = None, anon: int | None = None) -> None:
        p = self.peaks.setdefault(label, {"hwm": 0, "anon": 0})
        if hwm is not None:
            p["hwm"] = max(p["hwm"], hwm)
        if anon is not None:
            p["anon"] = max(p["anon"], anon)

    def boundary(self) -> None:
        self.note(self.label(), hwm=status()["VmHWM"])
        reset_peak()

    def wrap(self, owner, name: str, label) -> None:
        orig = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.boundary()
            self.stack.append(label(*args, **kwargs) if callable(label) else label)
            try:
                return orig(*args, **kwargs)
            finally:
                self.boundary()
                self.stack.pop()

        setattr(owner, name, wrapped)


def instrument(ph: Phases) -> None:
    from workers.engine import pipeline
    from workers.engine.checkpoint import Checkpoints
    from workers.engine.methods.gptq import GPTQMethod
    from workers.engine.model import StreamedModel
    from workers.engine.walk import LayerWalk

    def load(_model, i, *_a, **_k):
        ph.layer = i
        return "load"

    ph.wrap(StreamedModel, "capture_inputs", "capture")
    ph.wrap(StreamedModel, "load_layer", load)
    ph.wrap(LayerWalk, "watch", lambda _w, lin, *_a, **k: f"walk to {lin}" + (f" and {k['until_output_of']}'s output"
                                                                                if k.get("until_output_of") else ""))
    ph.wrap(LayerWalk, "finish", "final pass")
    ph.wrap(GPTQMethod, "_one_group", lambda _m, _ctx, _walk, g, _out: f"rest of {g.names[0]}'s group")
    ph.wrap(GPTQMethod, "solve_group", lambda _m, _layer, g, _h: f"solve {g.names[0]}'s group")
    ph.wrap(GPTQMethod, "apply", "apply")
    ph.wrap(Checkpoints, "save", "checkpoint")
    ph.wrap(pipeline, "release_heap", "trim")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--run-layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--ram-mib", type=int, default=64, help="activations_ram_bytes in MiB (the setting's default: 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-thread", action="store_true", help="run the job on a thread of its own, as a worker does")
    ap.add_argument("--json", help="save the peaks here")
    a = ap.parse_args()
    import torch

    from bench.worker_memory import model
    from storage.artifacts import LocalStore
    from tests.workers.engine.helpers import request
    from workers.engine.run import quantize

    src = model(a.layers, {"hidden": a.hidden, "intermediate": a.intermediate, "heads": a.hidden // 64, "kv_heads": a.hidden // 64})
    ph = Phases()
    instrument(ph)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            ph.note(ph.label(), anon=status()["RssAnon"])

    class Enough(Exception):
        pass

    def on_layer(report) -> None:
        print(f"layer {report.index}: {report.seconds:.0f} s, {status()}, load {os.getloadavg()[0]:.1f}", flush=True)
        if report.index + 1 >= a.run_layers:
            raise Enough

    def job() -> None:
        torch.set_num_threads(a.threads)
        calibration = {"dataset": "builtin:code", "num_samples": a.samples, "seq_len": a.seq_len}
        with tempfile.TemporaryDirectory(prefix="layer-phases-") as work:
            try:
                quantize(request(src, "gptq", bits=4, group_size=128, calibration=calibration), LocalStore(Path(work) / "ckpt"),
                         Path(work) / "out", device=torch.device("cpu"), on_layer=on_layer,
                         activations_dir=Path(work) / "activations", activations_ram_bytes=a.ram_mib * 2**20)
            except Enough:
                pass

    print(f"load average at start: {os.getloadavg()}; {status()}", flush=True)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.monotonic()
    reset_peak()
    if a.in_thread:
        th = threading.Thread(target=job)
        th.start()
        th.join()
    else:
        job()
    stop.set()
    ph.boundary()
    print(f"{time.monotonic() - t0:.0f} s; load average at end: {os.getloadavg()}")
    print(f"{'phase':60s} {'VmHWM':>6s} {'RssAnon':>8s}")
    for label, p in ph.peaks.items():
        print(f"{label:60s} {p['hwm']:6d} {p['anon'] or '':>8}")
    if a.json:
        Path(a.json).write_text(json.dumps(ph.peaks, indent=1))


if __name__ == "__main__":
    main()
