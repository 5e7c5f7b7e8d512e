"""What spilling activations to the scratch disk costs: the same job with every batch in RAM or every batch in files.

The engine keeps a walk's activation batches in RAM up to ``activations_ram_bytes``
and writes the rest to files in the job's scratch folder (workers/engine/
activations.py). This bench runs one job (width 1024, intermediate 2816) in two
fresh processes, one with no bound (all in RAM) and one with a bound of 0 (every
batch spilled, the worst case), and compares peak RSS (VmHWM), CPU seconds, wall
seconds and the sha256 of the outputs. AWQ reads its recorded calls and outputs
again for every α its scale search scores, so it is the method that re-reads most.

    .venv/bin/python -m bench.spill_cost [--method awq|gptq] [--samples 128] [--seq-len 512] [--layers 1] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, md_table
from bench.stored_inputs import model

CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from quantfarm.spec import AWQOptions
from tests.workers.engine import helpers

src, work, method, spill, samples, seq_len = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
helpers.OPTIONS["awq"] = AWQOptions
options = {"bits": 4, "group_size": 128} if method == "gptq" else {"group_size": 128}
t0, c0 = time.monotonic(), time.process_time()
helpers.run_job(Path(src), work, method, spill=work / "activations" if spill else None,
                calibration={"dataset": "builtin:code", "num_samples": samples, "seq_len": seq_len}, **options)
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
io = dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())
digest = hashlib.sha256()
for f in sorted((work / "out").rglob("*")):
    if f.is_file() and f.suffix == ".safetensors":
        digest.update(f.read_bytes())
print(json.dumps({"vm_hwm_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1), "wall_s": round(time.monotonic() - t0, 1),
                  "cpu_s": round(time.process_time() - c0, 1), "read_mib": round(int(io["rchar"]) / 2**20),
                  "written_mib": round(int(io["wchar"]) / 2**20), "sha256": digest.hexdigest()}))
"""


def run_one(src: str, method: str, spill: bool, samples: int, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="spill-cost-") as work:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", CHILD, src, work, method, "1" if spill else "0", str(samples), str(seq_len)],
                             env=env, capture_output=True, text=True, timeout=7200, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["awq", "gptq"], default="awq")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    load = os.getloadavg()
    src = model(a.layers)
    ram = run_one(src, a.method, False, a.samples, a.seq_len)
    disk = run_one(src, a.method, True, a.samples, a.seq_len)
    rows = [[label, r["vm_hwm_mib"], r["cpu_s"], r["wall_s"], r["read_mib"], r["written_mib"], r["sha256"][:12]]
            for label, r in (("all in RAM (no bound)", ram), ("all spilled (bound 0)", disk))]
    text = md_table(["activations", "VmHWM MiB", "CPU s", "wall s", "read MiB", "written MiB", "output sha256"], rows)
    same = ram["sha256"] == disk["sha256"]
    cmd = f"python -m bench.spill_cost --method {a.method} --samples {a.samples} --seq-len {a.seq_len} --layers {a.layers}"
    begin, end = f"<!-- spill_cost_{a.method}:begin -->", f"<!-- spill_cost_{a.method}:end -->"
    body = "\n".join([
        begin, f"## Activations spilled to the scratch disk: what it costs ({a.method.upper()})", "",
        (f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load[0]:.1f} at the start, "
         f"{os.getloadavg()[0]:.1f} at the end; each in a fresh process, 1 thread, no evaluation. Llama width 1024, "
         f"intermediate 2816, {a.layers} layers, {a.samples}×{a.seq_len} calibration tokens."), "", text, "",
        (f"Output bytes identical: **{'yes' if same else 'NO'}**. VmHWM saved: {ram['vm_hwm_mib'] - disk['vm_hwm_mib']:.0f} MiB; "
         f"CPU time {disk['cpu_s'] / ram['cpu_s']:.2f}×, wall {disk['wall_s'] / ram['wall_s']:.2f}× (read/written: bytes through "
         "read and write calls, the model's shards included)."), "", end])
    print(body)
    if a.write:
        from bench.common import write_section

        write_section(body, begin, end)
    if not same:
        raise SystemExit("the two runs wrote different bytes")


if __name__ == "__main__":
    main()
