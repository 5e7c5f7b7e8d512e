"""The bench's model and token windows, built once and shared by every tool.

The model is tests/support/trained.py's small Llama trained on Python stdlib
sources, at a bench size, cached under bench/.cache/models. Calibration and
held-out windows are cut by the engine's own calibration module and saved as
.pt files that every tool (ours and the peers, in their venvs) reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.common import CACHE, ROOT

# Bench size: trains in ~8-15 minutes on 2 cores, once; dims are multiples of 128
# so every peer's CPU path accepts them and group size 128 fits every linear.
# 800 x 16 x 128 = 1.6M tokens: an undertrained model (300 steps gave perplexity ~100)
# has so little to lose that every 4-bit method lands within evaluation noise of fp32.
# Every training field is pinned here, so a change of trained.py's defaults does not silently retrain.
BENCH_MODEL = {"hidden": 256, "intermediate": 768, "layers": 4, "heads": 4, "kv_heads": 4, "steps": 800, "batch": 16, "seq_len": 128,
               "lr": 3e-3, "warmup": 40, "weight_decay": 0.1, "train_chars": 3_000_000, "seed": 0}
QUICK_MODEL = {**BENCH_MODEL, "hidden": 128, "intermediate": 256, "layers": 2, "steps": 30, "batch": 8}
SEQ_LEN = 128  # the model's training length: evaluating longer would measure RoPE extrapolation
CALIB_SAMPLES = 128
EVAL_WINDOWS = 256  # 32k tokens from many files; 64 windows come from a handful


def bench_model(quick: bool = False) -> Path:
    """Return the trained bench model's directory, training it on first use."""
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.support.trained import trained_llama

    torch.set_num_threads(2)
    return trained_llama(CACHE / "models", **(QUICK_MODEL if quick else BENCH_MODEL))


def windows(model_dir: Path, *, num_samples: int = CALIB_SAMPLES, seq_len: int = SEQ_LEN, eval_windows: int = EVAL_WINDOWS) -> tuple[Path, Path]:
    """Write (once) the calibration and held-out windows for ``model_dir``; return their paths."""
    from transformers import AutoTokenizer

    from quantfarm.spec import Calibration, Evaluation
    from workers.engine.calibration import calibration_ids, evaluation_ids

    d = CACHE / "windows" / f"{Path(model_dir).name}-n{num_samples}-s{seq_len}-e{eval_windows}"
    calib, held = d / "calib.pt", d / "eval.pt"
    if calib.is_file() and held.is_file():
        return calib, held
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = calibration_ids(Calibration(dataset="builtin:code", num_samples=num_samples, seq_len=seq_len), tok)
    e = evaluation_ids(Evaluation(max_windows=eval_windows), tok, seq_len)
    if c.shape[0] < num_samples or e.shape[0] < eval_windows:
        raise RuntimeError(f"not enough text for {num_samples} calibration / {eval_windows} held-out windows")
    torch.save(c.contiguous(), calib)
    torch.save(e.contiguous(), held)
    return calib, held
