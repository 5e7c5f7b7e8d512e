"""Calibration and evaluation text: built-in code, inline texts, uploads and the Hub (offline here)."""

from __future__ import annotations

import pytest
import torch

from quantfarm.errors import CalibrationError
from quantfarm.spec import Calibration, Evaluation
from workers.engine.calibration import (
    builtin_code_texts,
    calibration_ids,
    evaluation_ids,
    token_windows,
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _paths(texts: list[str]) -> set[str]:
    return {t.split("\n", 1)[0].removeprefix("# ") for t in texts}


def test_builtin_code_is_deterministic_and_disjoint_from_heldout():
    calib = builtin_code_texts(holdout=False, max_chars=400_000)
    assert calib == builtin_code_texts(holdout=False, max_chars=400_000)
    held = builtin_code_texts(holdout=True, max_chars=10**9)  # every held-out file
    assert len(held) > 20 and sum(map(len, calib)) >= 400_000
    assert _paths(calib).isdisjoint(_paths(held))
    assert {t.split("\n", 1)[1] for t in calib}.isdisjoint({t.split("\n", 1)[1] for t in held})
    assert all(p.endswith(".py") and "site-packages" not in p for p in _paths(calib) | _paths(held))


def test_calibration_windows_shape_and_determinism(tokenizer):
    cal = Calibration(num_samples=12, seq_len=48)
    ids = calibration_ids(cal, tokenizer)
    assert ids.shape == (12, 48) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(cal, tokenizer))
    assert len({tuple(r) for r in ids.tolist()}) == 12  # distinct windows, not one repeated
    assert calibration_ids(Calibration(num_samples=3, seq_len=128), tokenizer).shape == (3, 128)


def test_evaluation_windows_come_from_heldout_files(tokenizer):
    ev = evaluation_ids(Evaluation(max_windows=6), tokenizer, seq_len=64)
    assert ev.shape == (6, 64)
    held = builtin_code_texts(holdout=True, max_chars=6 * 64 * 8, seed=1)
    stream = []
    for t in held:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = {tuple(stream[i:i + 64]) for i in range(0, len(stream) - 63, 64)}
    assert all(tuple(r) in windows for r in ev.tolist())
    calib = calibration_ids(Calibration(num_samples=64, seq_len=64), tokenizer)
    assert not {tuple(r) for r in ev.tolist()} & {tuple(r) for r in calib.tolist()}


def test_inline_texts_cut_into_full_windows_only(tokenizer):
    text = "def f(x):\n    return x * 2\n" * 200
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    ids = calibration_ids(Calibration(texts=[text], num_samples=1000, seq_len=64), tokenizer)
    assert ids.shape == (n_tokens // 64, 64)  # the short tail is dropped, never padded
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == stream[:64]


def test_too_short_text_is_a_clear_error(tokenizer):
    with pytest.raises(CalibrationError) as err:
        calibration_ids(Calibration(texts=["x = 1"], num_samples=4, seq_len=64), tokenizer)
    e = err.value
    assert e.code == "calibration_error"
    assert "at least seq_len=64 are needed" in e.message and "smaller seq_len" in e.message
    assert e.details["seq_len"] == 64 and 0 < e.details["tokens"] < 64


def test_upload(tokenizer):
    text = "import os\nprint(os.getcwd())\n" * 100
    seen = []
    ids = calibration_ids(Calibration(upload_id="up_1", num_samples=2, seq_len=32), tokenizer,
                          read_upload=lambda uid: seen.append(uid) or text)
    assert seen == ["up_1"] and ids.shape == (2, 32)
    with pytest.raises(CalibrationError, match="Uploaded calibration files are not available"):
        calibration_ids(Calibration(upload_id="up_1"), tokenizer)


def test_hub_dataset_offline_is_a_clear_error(tokenizer, monkeypatch):
    """The Hub is unreachable here; with HF_HUB_OFFLINE=1 ``datasets`` must fail fast and we explain."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variable at import; an already-imported copy needs its flag set too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CalibrationError) as err:
        calibration_ids(Calibration(dataset="hub:wikitext:wikitext-2-raw-v1:train", num_samples=4, seq_len=32), tokenizer)
    e = err.value
    assert e.code == "calibration_error"
    assert "Could not load Hub dataset 'wikitext'" in e.message
    assert "offline" in e.message and "builtin:code" in e.message and "uploaded file" in e.message
    assert e.details == {"dataset": "hub:wikitext:wikitext-2-raw-v1:train"}


def test_token_windows_picks_a_seeded_subset(tokenizer):
    texts = builtin_code_texts(holdout=False, max_chars=50_000)
    a = token_windows(texts, tokenizer, num_samples=5, seq_len=32, seed=0)
    b = token_windows(texts, tokenizer, num_samples=5, seq_len=32, seed=1)
    assert a.shape == b.shape == (5, 32) and not torch.equal(a, b)
