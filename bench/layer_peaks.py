"""Each layer's peak and floor RssAnon in one engine process (no stack), sampled every 0.05 s.

With a tiny calibration set the activations are negligible, so what moves the per-layer
peak is the weight side (Hessian inverse, solve, dequantize, checkpoint). Prints JSON:
{"peaks": {layers done: MiB}, "floors": {...}, "s": seconds}.

    .venv/bin/python -m bench.layer_peaks [--layers 48] [--samples 1] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def rss_anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    import torch

    from bench.worker_memory import PRESETS, model
    from tests.workers.engine.helpers import run_job

    torch.set_num_threads(1)
    geo = {k: v for k, v in PRESETS["wide"].items() if k != "layers"}
    src = model(a.layers, geo)
    cur, peaks, floors, stop = {"layer": -1}, {}, {}, threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            m, k = rss_anon_mib(), cur["layer"]
            peaks[k], floors[k] = max(peaks.get(k, 0), m), min(floors.get(k, 1 << 30), m)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="layer-peaks-") as work:
        run_job(src, Path(work), "gptq", bits=4, group_size=128, on_layer=lambda r: cur.update(layer=r.index + 1),
                calibration={"dataset": "builtin:code", "num_samples": a.samples, "seq_len": a.seq_len})
    stop.set()
    print(json.dumps({"peaks": peaks, "floors": floors, "s": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
