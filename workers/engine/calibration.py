"""Calibration and evaluation text, turned into fixed-length token windows."""

from __future__ import annotations

import functools
import os
import random
import re
import sysconfig
import zlib
from pathlib import Path
from typing import Callable

import torch

from quantfarm.errors import CalibrationError

_HUB_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # org/name, as spec checks

# Held-out split of the built-in code set: files whose name hashes to 0 mod 10.
_HOLDOUT_MOD = 10


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = tuple(p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    if not files:
        raise CalibrationError(f"No Python sources found under {root} for builtin:code.")
    return files


def _is_holdout(path: Path) -> bool:
    return zlib.crc32(path.name.encode()) % _HOLDOUT_MOD == 0


def builtin_code_texts(*, holdout: bool, max_chars: int, seed: int = 0) -> list[str]:
    """Python stdlib sources from the running interpreter (always there offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in _stdlib_files() if _is_holdout(p) == holdout]
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(f"# {p.relative_to(root)}\n{t}")
        total += len(t)
        if total >= max_chars:
            break
    return texts


def hub_texts(spec: str, max_chars: int, token: str | None = None) -> list[str]:
    """Load ``hub:<dataset>[:<config>][:<split>]`` through ``datasets``, with the job's token or none at all."""
    parts = spec.split(":")[1:]
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    if not _HUB_DATASET.match(name) or ".." in name or os.path.lexists(name) or os.path.lexists(f"{name}.py"):
        # datasets reads a folder or script of that name from the working directory before asking the Hub.
        raise CalibrationError(f"Hub dataset {name!r} is not a Hub dataset id, or names a path on this worker; "
                               "calibration sets come from the Hub, never from a worker's disk.", details={"dataset": spec})
    try:
        import datasets
    except ImportError:
        raise CalibrationError("Hub calibration sets need the 'datasets' package: pip install datasets.") from None
    try:
        # token=False, not None: without the job's token, never the worker's HF_TOKEN or cached login.
        ds = datasets.load_dataset(name, config, split=split, streaming=True, token=token or False)
        texts, total = [], 0
        for row in ds:
            t = row.get("text") or next((v for v in row.values() if isinstance(v, str)), None)
            if t:
                texts.append(t)
                total += len(t)
            if total >= max_chars:
                break
    except Exception as exc:  # datasets raises many kinds; all mean "could not load"
        raise CalibrationError(
            f"Could not load Hub dataset {name!r} ({type(exc).__name__}: {str(exc)[:200]}). "
            "If this worker is offline, use builtin:code, texts, or an uploaded file instead.",
            details={"dataset": spec},
        ) from None
    return texts


def token_windows(texts: list[str], tokenizer, *, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Join texts with EOS, cut non-overlapping ``seq_len`` windows, pick ``num_samples``.

    Windows shorter than ``seq_len`` (the tail) are dropped. Raises
    CalibrationError when the text does not fill a single window.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = num_samples * seq_len * 4  # read enough to choose windows from, then stop
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    n = len(stream) // seq_len
    if n == 0:
        raise CalibrationError(
            f"The calibration text has {len(stream)} tokens; at least seq_len={seq_len} are needed. "
            "Give more text or a smaller seq_len.",
            details={"tokens": len(stream), "seq_len": seq_len},
        )
    idx = list(range(n))
    if n > num_samples:
        idx = sorted(random.Random(seed).sample(idx, num_samples))
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return ids[idx]


def calibration_ids(calibration, tokenizer, *, read_upload: Callable[[str], str] | None = None,
                    hub_token: str | None = None) -> torch.Tensor:
    """Token windows for a job's ``calibration`` spec."""
    budget = calibration.num_samples * calibration.seq_len * 8
    if calibration.texts is not None:
        texts = calibration.texts
    elif calibration.upload_id is not None:
        if read_upload is None:
            raise CalibrationError("Uploaded calibration files are not available on this worker.")
        texts = [read_upload(calibration.upload_id)]
    elif calibration.dataset.startswith("builtin:"):
        texts = builtin_code_texts(holdout=False, max_chars=budget)
    else:
        texts = hub_texts(calibration.dataset, budget, hub_token)
    return token_windows(texts, tokenizer, num_samples=calibration.num_samples, seq_len=calibration.seq_len)


def evaluation_ids(evaluation, tokenizer, seq_len: int) -> torch.Tensor:
    """Held-out windows: the job's eval texts, or built-in code not used for calibration."""
    texts = evaluation.texts or builtin_code_texts(holdout=True, max_chars=evaluation.max_windows * seq_len * 8, seed=1)
    return token_windows(texts, tokenizer, num_samples=evaluation.max_windows, seq_len=seq_len, seed=1)
