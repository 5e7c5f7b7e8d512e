"""Helpers for the tool scripts. Only torch + transformers: these run in every venv.

Each script pins threads before importing anything heavy, times its imports and
its quantization separately, and writes one JSON result for the parent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

T_START = time.perf_counter()


def pin_threads() -> int:
    """Use the same number of threads in every tool (the parent sets BENCH_THREADS)."""
    import torch

    n = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass
    return n


def warm_imports(arch: str = "llama") -> None:
    """Import what transformers would import lazily inside the timed region.

    transformers loads a model family's modules on first use; on a busy 2-core
    machine that is several seconds. Every tool calls this before its clock
    starts, so "quantize seconds" means the same work for all of them.
    """
    import importlib

    for mod in ("transformers.modeling_utils", "transformers.generation.utils", "transformers.masking_utils",
                f"transformers.models.{arch}.configuration_{arch}", f"transformers.models.{arch}.modeling_{arch}",
                "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_fast", "safetensors.torch", "accelerate"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def model_type(model_dir: str) -> str:
    """The ``model_type`` in a model directory's config.json (``llama`` when unreadable)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f).get("model_type", "llama")
    except (OSError, ValueError):
        return "llama"


def parser(desc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=desc)
    ap.add_argument("--model", required=True, help="source model directory")
    ap.add_argument("--calib", help="calibration windows .pt (LongTensor [n, seq_len])")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--result", required=True, help="where to write the JSON result")
    return ap


def peak_rss_mb() -> float | None:
    """This process's RSS high-water mark (VmHWM), in MiB.

    Unlike ``ru_maxrss`` seen through wait4, VmHWM belongs to the process's own
    address space, so it does not inherit the parent's RSS at fork/exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def gpu_peak_mb() -> float | None:
    """Peak GPU memory this process allocated through torch (MiB); None without CUDA in use."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def write_result(path: str, **data) -> None:
    data.setdefault("vmhwm_mb", peak_rss_mb())
    data.setdefault("gpu_peak_mb", gpu_peak_mb())
    data.setdefault("process_seconds_inside", round(time.perf_counter() - T_START, 3))
    data.setdefault("python", sys.executable)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def load_windows(path: str):
    import torch

    ids = torch.load(path)
    assert ids.dtype == torch.long and ids.dim() == 2, f"{path}: expected LongTensor [n, seq_len]"
    return ids


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


def perplexity(model, windows, batch: int = 8) -> tuple[float, float, int]:
    """exp(mean next-token NLL) of ``model`` over ``windows``; also (sum NLL, tokens)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
            target = chunk[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            count += target.numel()
    return math.exp(total / count), total, count
