"""On one CUDA GPU: ours vs GPTQModel, GPTQ and AWQ, at a realistic geometry — time, peak GPU memory, outputs usable.

    .venv/bin/python -m bench.gpu_check [--layers 4] [--hidden 2048] [--json out.json]
    .venv/bin/python -m bench.gpu_check --device cpu --tiny      # dry run of the plumbing, no GPU needed

The model is a random Llama at TinyLlama-1.1B's geometry (hidden 2048, intermediate
5632, 32 heads, 4 KV heads) cut to ``--layers`` layers, saved in bf16 as real
checkpoints are. Every tool runs in its own process on the same GPU, one after the
other, with the same calibration windows (128 x 512 tokens; ``--tiny``: 8 x 64). Each
reports its quantize time and ``torch.cuda.max_memory_allocated``; the table gives
ours / GPTQModel for both. Every output is then loaded through transformers
(+ gptqmodel's kernels) and must give finite logits and generate tokens, and, when vLLM
is installed (and the device is a GPU), loaded in vLLM and made to generate.

Without a CUDA device (and without ``--device cpu``) it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from bench.common import CACHE, OUR_PYTHON, ROOT, TOOLS, fmt, md_table, pinned_env, ratio, run_measured

TINYLLAMA = {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4}
TINY = {"hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2}
NO_CUDA = 2


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def model(width: dict, layers: int, arch: str = "llama") -> Path:
    """A random ``arch`` model at ``width`` with ``layers`` layers, stored in bf16 (built once, cached)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.support.models import make_tiny_model, train_tokenizer

    tok = train_tokenizer(CACHE / "models" / "tokenizer")
    name = f"random-{arch}-h{width['hidden']}-i{width['intermediate']}-kv{width['kv_heads']}-l{layers}-bf16"
    return make_tiny_model(CACHE / "models" / name, arch, tokenizer_dir=tok, layers=layers, dtype=torch.bfloat16, **width)


def jobs(model_dir: Path, calib: Path, work: Path, device: str) -> dict[str, tuple[Path, list[str], str]]:
    """label -> (script, args, output kind). Defaults of each tool, at 4 bits and group 128."""
    common = ["--model", str(model_dir), "--calib", str(calib), "--device", device]
    gm_dtype = "float32" if device == "cpu" else "bfloat16"
    return {
        "ours GPTQ": (TOOLS / "ours.py", [*common, "--out", str(work / "ours-gptq"), "--method", "gptq",
                                          "--options", json.dumps({"bits": 4, "group_size": 128})], "gptq"),
        "GPTQModel GPTQ": (TOOLS / "gptqmodel_quant.py", [*common, "--out", str(work / "gptqmodel-gptq"), "--method", "gptq", "--dtype", gm_dtype,
                                                         "--options", json.dumps({"bits": 4, "group_size": 128}), "--batch-size", "8"], "gptq"),
        "ours AWQ": (TOOLS / "ours.py", [*common, "--out", str(work / "ours-awq"), "--method", "awq",
                                         "--options", json.dumps({"bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"})], "awq"),
        "GPTQModel AWQ": (TOOLS / "gptqmodel_quant.py", [*common, "--out", str(work / "gptqmodel-awq"), "--method", "awq", "--dtype", "bfloat16",
                                                        "--options", json.dumps({"method": "awq", "format": "gemm", "bits": 4, "group_size": 128,
                                                                                 "sym": False}), "--batch-size", "8"], "awq"),
    }


def out_dir(args: list[str]) -> Path:
    return Path(args[args.index("--out") + 1])


def run(device: str, width: dict, layers: int, n: int, seq_len: int, log=print) -> dict:
    from bench.data import windows

    src = model(width, layers)
    calib, _held = windows(src, num_samples=n, seq_len=seq_len, eval_windows=1)
    work = CACHE / "runs" / "gpu-check"
    env = pinned_env(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0")) if device != "cpu" else pinned_env()
    vllm = device != "cpu" and importlib.util.find_spec("vllm") is not None
    rows = {}
    for label, (script, args, kind) in jobs(src, calib, work, device).items():
        log(f"[gpu-check] {label}")
        m = run_measured(label, OUR_PYTHON, script, args, env=env, log_dir=work / "logs", timeout=3600)
        row = {"ok": m.ok, "quant_s": m.result.get("quant_seconds"), "gpu_peak_mb": m.result.get("gpu_peak_mb"),
               "rss_peak_mb": m.peak_rss_mb, "log_tail": None if m.ok else m.log_tail[-1500:]}
        if m.ok:
            g = run_measured(f"{label} generate", OUR_PYTHON, TOOLS / "generate.py",
                             ["--model", str(out_dir(args)), "--kind", kind, "--device", device], env=env, log_dir=work / "logs")
            row["generate"] = {"ok": g.ok and g.result.get("finite") and g.result.get("new_tokens", 0) > 0,
                               "new_tokens": g.result.get("new_tokens"), "text": g.result.get("text"),
                               "error": None if g.ok else g.log_tail[-800:]}
            if vllm:
                v = run_measured(f"{label} vllm", OUR_PYTHON, TOOLS / "vllm_check.py", ["--model", str(out_dir(args))], env=env,
                                 log_dir=work / "logs")
                row["vllm"] = {"ok": v.ok and v.result.get("new_tokens", 0) > 0, "quantization": v.result.get("quantization"),
                               "error": None if v.ok else v.log_tail[-800:]}
        rows[label] = row
    res = {"device": device, "width": width, "layers": layers, "calibration": [n, seq_len], "source_dtype": "bfloat16",
           "vllm": "installed" if vllm else "not run (not installed or no GPU)", "rows": rows, "load_avg": os.getloadavg()}
    if device != "cpu":
        import torch

        res["gpu"] = torch.cuda.get_device_name(0)
    return res


def table(res: dict) -> str:
    r = res["rows"]
    lines = []
    for method in ("GPTQ", "AWQ"):
        ours, peer = r.get(f"ours {method}", {}), r.get(f"GPTQModel {method}", {})
        usable = []
        for who, row in (("ours", ours), ("GPTQModel", peer)):
            gen = row.get("generate", {}).get("ok")
            vl = row.get("vllm", {}).get("ok") if "vllm" in row else None
            usable.append(f"{who}: load+generate {'ok' if gen else 'FAILED'}" + ("" if vl is None else f", vLLM {'ok' if vl else 'FAILED'}"))
        lines.append([method, fmt(ours.get("quant_s")), fmt(peer.get("quant_s")), ratio(ours.get("quant_s"), peer.get("quant_s")),
                      fmt(ours.get("gpu_peak_mb"), 0), fmt(peer.get("gpu_peak_mb"), 0), ratio(ours.get("gpu_peak_mb"), peer.get("gpu_peak_mb")),
                      "; ".join(usable)])
    return md_table(["w4 g128", "ours s", "GPTQModel s", "time ours/peer", "ours GPU MiB", "GPTQModel GPU MiB", "GPU mem ours/peer",
                     "outputs"], lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--tiny", action="store_true", help="hidden 128, 2 layers, 8 x 64 calibration tokens: checks the plumbing")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, help="override TinyLlama's width (intermediate 2.75x, 64-dim heads, 8 heads per KV head)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.device != "cpu" and not cuda_devices():
        print("bench.gpu_check: no CUDA device here (torch.cuda.is_available() is False). It measures on a GPU; "
              "run it on a CUDA machine, or `--device cpu --tiny` for a dry run of the plumbing.", file=sys.stderr)
        return NO_CUDA
    width = dict(TINY if a.tiny else TINYLLAMA)
    if a.hidden:
        heads = a.hidden // 64
        width = {"hidden": a.hidden, "intermediate": a.hidden * 11 // 4, "heads": heads, "kv_heads": max(1, heads // 8)}
    layers = 2 if a.tiny else a.layers
    n, seq_len = (8, 64) if a.tiny else (128, 512)
    print(f"load average at start: {os.getloadavg()}")
    res = run(a.device, width, layers, n, seq_len)
    print(table(res))
    for label, row in res["rows"].items():
        if not row["ok"]:
            print(f"{label} FAILED:\n{row['log_tail']}")
        elif not row["generate"]["ok"]:
            print(f"{label} output did not load/generate:\n{row['generate']['error']}")
    print(f"load average at end: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    ok = all(row["ok"] and row["generate"]["ok"] and row.get("vllm", {"ok": True})["ok"] for row in res["rows"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
