"""Quantize with our engine (``workers.engine.run.quantize``) on the shared calibration windows.

Runs in our venv. The engine normally tokenizes its calibration spec itself;
here it is handed the exact windows every peer gets (the .pt file), by
replacing ``calibration_ids`` in the pipeline module for this process only.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: quantfarm, workers, storage

from bench.tools._child import (
    T_START,
    load_windows,
    model_type,
    parser,
    pin_threads,
    versions,
    warm_imports,
    write_result,
)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--options", default="{}", help="method options as JSON")
    ap.add_argument("--profile", help="write a cProfile of the quantize call here")
    ap.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:N)")
    ap.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                    help="a bf16 source on CPU: computed in bf16 (on), float32 (off), or as the CPU suits (auto, the worker's default)")
    a = ap.parse_args()
    threads = pin_threads()

    import torch

    from quantfarm.spec import METHOD_OPTIONS, Calibration
    from storage.artifacts import LocalStore
    from workers.engine import pipeline
    from workers.engine.model import compute_dtype, prefer_cpu_bf16, read_config
    from workers.engine.run import quantize

    prefer_cpu_bf16({"auto": None, "on": True, "off": False}[a.cpu_bf16])
    src = getattr(read_config(Path(a.model)), "dtype", None) or torch.float32
    dtype = compute_dtype(getattr(torch, src) if isinstance(src, str) else src, torch.device(a.device))
    warm_imports(model_type(a.model))
    t_imports = time.perf_counter() - T_START
    windows = load_windows(a.calib)
    n, seq_len = windows.shape

    def fixed_windows(calibration, tokenizer, **_source):  # read_upload, hub_token: unused, the windows are given
        assert (calibration.num_samples, calibration.seq_len) == (n, seq_len)
        return windows.clone()

    pipeline.calibration_ids = fixed_windows
    out = Path(a.out)
    ckpt_dir = out.parent / (out.name + ".checkpoints")
    for d in (out, ckpt_dir):
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True)
    req = pipeline.QuantizeRequest(
        source_dir=Path(a.model), method=a.method, options=METHOD_OPTIONS[a.method](**json.loads(a.options)),
        calibration=Calibration(num_samples=n, seq_len=seq_len), base_model="bench",
    )
    layers: list[float] = []
    def on_layer(report) -> None:
        layers.append(round(report.seconds, 3))
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    res = quantize(req, LocalStore(ckpt_dir), out, device=torch.device(a.device), on_layer=on_layer)
    t_quant = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        prof.dump_stats(a.profile)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    write_result(
        a.result, tool="ours", method=a.method, threads=threads, import_seconds=round(t_imports, 3),
        quant_seconds=round(t_quant, 3), quant_cpu_seconds=round(time.process_time() - c0, 3), layer_seconds=layers, engine_metrics=res.metrics,
        quantization_config=res.quantization_config, versions=versions("torch", "transformers"),
        dtype=str(dtype).removeprefix("torch."),
    )


if __name__ == "__main__":
    main()
