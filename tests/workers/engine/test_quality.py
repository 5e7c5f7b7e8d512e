"""On a model that has learnt something, GPTQ loses less than round-to-nearest.

The model is tests/support/trained.py's small Llama trained on stdlib sources
(cached under the test cache dir; the first run trains it, about three minutes). Perplexity is the engine's own ``evaluate`` metric on held-out stdlib files
never used for calibration.

Why w4 g64 and 256 evaluation windows: on a model this small, 4-bit rounding moves
the held-out loss by a few 1e-3 nats, and the first-order part of that change
(random in sign) is as large as the second-order part (always a loss) when only
~30 windows from a handful of files are scored. With 256 windows the first-order
part shrinks several-fold, and GPTQ < RTN held in every trained model and group
size we tried (4 trainings of 700-1400 steps x g32/g64, act-order on and off). The
margin grows with training: at 700 steps GPTQ kept about half of RTN's g64 loss, at
1400 steps (the default) none of it.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.trained import (
    EVAL_WINDOWS,
    heldout_perplexity,
    heldout_windows,
    trained_report,
)
from tests.workers.engine.helpers import run_job

CALIBRATION = dict(num_samples=128, seq_len=128)
EVALUATION = dict(max_windows=EVAL_WINDOWS)
W4 = dict(bits=4, group_size=64, sym=True)


@pytest.fixture(scope="module")
def results(trained_model, tmp_path_factory):
    gptq, _ = run_job(trained_model, tmp_path_factory.mktemp("gptq"), "gptq", calibration=CALIBRATION,
                      evaluate=True, evaluation=EVALUATION, **W4)
    rtn, _ = run_job(trained_model, tmp_path_factory.mktemp("rtn"), "rtn", calibration=CALIBRATION,
                     evaluate=True, evaluation=EVALUATION, **W4)
    return gptq.metrics, rtn.metrics


def test_the_model_has_learnt(trained_model):
    report = trained_report(trained_model)
    print(f"\ntrained model: held-out perplexity {report['perplexity']} (random init {report['perplexity_random']})")
    assert report["perplexity"] < 100 and report["perplexity"] < report["perplexity_random"] / 8


def test_streamed_evaluation_equals_a_plain_forward(trained_model, results):
    """The engine's layer-at-a-time perplexity is transformers' perplexity on the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32, device_map="cpu")
    windows = heldout_windows(AutoTokenizer.from_pretrained(trained_model), CALIBRATION["seq_len"], EVALUATION["max_windows"])
    assert results[0]["perplexity_before"] == pytest.approx(heldout_perplexity(model, windows), rel=1e-4)


def test_gptq_4bit_beats_rtn_4bit(results):
    gptq, rtn = results
    print(f"\nheld-out perplexity: float {gptq['perplexity_before']:.4f}, gptq w4g64 {gptq['perplexity_after']:.4f}, "
          f"rtn w4g64 {rtn['perplexity_after']:.4f}")
    assert gptq["perplexity_before"] == rtn["perplexity_before"]  # the same held-out windows
    assert gptq["perplexity_after"] < rtn["perplexity_after"]
    assert rtn["perplexity_after"] > rtn["perplexity_before"]  # RTN loses something to recover
    # Not a rounding-noise win: GPTQ keeps well under what RTN loses.
    assert gptq["perplexity_after"] - gptq["perplexity_before"] < 0.5 * (rtn["perplexity_after"] - rtn["perplexity_before"])


@pytest.mark.parametrize("which", [0, 1], ids=["gptq", "rtn"])
def test_metrics_are_sane(results, which):
    m = results[which]
    assert m["eval_tokens"] == EVALUATION["max_windows"] * CALIBRATION["seq_len"]
    assert m["perplexity_before"] * 0.9 <= m["perplexity_after"] < m["perplexity_before"] * 1.1
    # Three quarters of the float32 bytes are decoder linears, now 4-bit.
    assert 0 < m["size_bytes_after"] < m["size_bytes_before"] / 2
    assert m["quantize_seconds"] > 0 and m["evaluate_seconds"] > 0
