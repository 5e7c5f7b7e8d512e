"""GPTQ's closing linears' inputs: kept for every calibration batch, or computed again (same bytes, less memory).

With ``true_sequential`` the sub-module a linear closes (``down_proj`` closes the MLP)
gets its output from that linear's inputs once it is quantized. The engine keeps them
from the Hessian pass while they take at most ``STORED_INPUTS_MAX_BYTES`` and computes
them again by a second pass above it. This bench runs the same job (width 1024,
intermediate 2816) in two fresh processes, one that always keeps them and one that
always computes them again (bound 0), and compares their peak RSS (VmHWM), CPU
seconds and the sha256 of every output file.

    .venv/bin/python -m bench.stored_inputs [--samples 64] [--seq-len 256] [--layers 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import CACHE, ROOT, md_table

CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from workers.engine.methods import gptq
from tests.workers.engine.helpers import run_job

src, work, bound, samples, seq_len = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
gptq.STORED_INPUTS_MAX_BYTES = bound
t0, c0 = time.monotonic(), time.process_time()
run_job(Path(src), work, "gptq", bits=4, group_size=128,
        calibration={"dataset": "builtin:code", "num_samples": samples, "seq_len": seq_len})
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
digest = hashlib.sha256()
for f in sorted((work / "out").rglob("*")):
    if f.is_file() and f.suffix == ".safetensors":
        digest.update(f.read_bytes())
print(json.dumps({"vm_hwm_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1), "wall_s": round(time.monotonic() - t0, 1),
                  "cpu_s": round(time.process_time() - c0, 1), "sha256": digest.hexdigest()}))
"""


def model(layers: int) -> str:
    sys.path.insert(0, str(ROOT))
    from tests.support.models import make_tiny_model, train_tokenizer

    tok = train_tokenizer(CACHE / "models" / "tokenizer")
    return str(make_tiny_model(CACHE / "models" / f"random-llama-h1024-i2816-a16-kv16-l{layers}", "llama", tokenizer_dir=tok,
                               layers=layers, hidden=1024, intermediate=2816, heads=16, kv_heads=16))


def run_one(src: str, bound: int, samples: int, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="stored-inputs-") as work:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", CHILD, src, work, str(bound), str(samples), str(seq_len)], env=env,
                             capture_output=True, text=True, timeout=7200, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    load = os.getloadavg()
    src = model(a.layers)
    kept = run_one(src, 2**62, a.samples, a.seq_len)
    again = run_one(src, 0, a.samples, a.seq_len)
    stored_mib = a.samples * a.seq_len * 2816 * 4 / 2**20
    rows = [["kept (no bound)", kept["vm_hwm_mib"], kept["cpu_s"], kept["wall_s"], kept["sha256"][:12]],
            ["computed again (bound 0)", again["vm_hwm_mib"], again["cpu_s"], again["wall_s"], again["sha256"][:12]]]
    text = md_table(["closing linears' inputs", "VmHWM MiB", "CPU s", "wall s", "output sha256"], rows)
    same = kept["sha256"] == again["sha256"]
    cmd = f"python -m bench.stored_inputs --samples {a.samples} --seq-len {a.seq_len} --layers {a.layers}"
    body = "\n".join([
        "<!-- stored_inputs:begin -->", "## GPTQ's stored linear inputs: kept or computed again", "",
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; each in a fresh process, 1 thread. Llama width 1024, intermediate 2816, "
        f"{a.layers} layers, GPTQ w4 g128, {a.samples}×{a.seq_len} calibration tokens: the down_proj inputs of all batches "
        f"are {stored_mib:.0f} MiB.", "", text, "",
        f"Output bytes identical: **{'yes' if same else 'NO'}**. VmHWM saved: {kept['vm_hwm_mib'] - again['vm_hwm_mib']:.0f} MiB; "
        f"CPU time {again['cpu_s'] / kept['cpu_s']:.2f}× (at bound 0 both closing linears are computed again: o_proj's inputs rerun the attention, down_proj's the MLP's gate and up projections; at the default 256 MiB bound only inputs over it are, here down_proj's).",
        "", "<!-- stored_inputs:end -->"])
    print(body)
    if a.write:
        from bench.common import write_section

        write_section(body, "<!-- stored_inputs:begin -->", "<!-- stored_inputs:end -->")
    if not same:
        raise SystemExit("the two runs wrote different bytes")


if __name__ == "__main__":
    main()
