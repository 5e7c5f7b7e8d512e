"""GPTQ's defaults are its best settings that cost nothing at inference: static act-order.

Act-order (``desc_act``) quantizes the columns with the largest Hessian diagonal
first; ``static_groups`` fixes each group's scale and zero before the solve, so
groups stay in column order and the checkpoint's ``g_idx`` is the plain
``column // group_size`` every kernel runs without a gather. On the trained test
model (tests/support/trained.py) the default beats the old default (no act-order)
at 3 and 2 bits, where methods separate (at 4 bits both sit within noise of float).
"""

from __future__ import annotations

import json

import pytest
import torch

from quantfarm.spec import GPTQOptions
from tests.support.trained import EVAL_WINDOWS
from tests.workers.engine.helpers import open_checkpoints, run_job
from workers.engine.arch import ARCHITECTURES

pytestmark = pytest.mark.trains  # trains its model (tests/support/trained.py) when the cache is empty

CALIBRATION = dict(num_samples=128, seq_len=128)
EVALUATION = dict(max_windows=EVAL_WINDOWS)
OLD_DEFAULT = dict(desc_act=False, static_groups=False)


def test_the_default_spec_is_static_act_order():
    o = GPTQOptions()
    assert (o.desc_act, o.static_groups) == (True, True)
    assert GPTQOptions.model_validate({"bits": 3}).desc_act is True


@pytest.fixture(scope="module")
def perplexities(trained_model, tmp_path_factory):
    out = {}
    for bits in (3, 2):
        for name, options in (("default", {}), ("old", OLD_DEFAULT)):
            work = tmp_path_factory.mktemp(f"w{bits}-{name}")
            res, store = run_job(trained_model, work, "gptq", calibration=CALIBRATION, evaluate=True,
                                 evaluation=EVALUATION, bits=bits, **options)
            out[bits, name] = (res.metrics, work, store)
    return out


@pytest.mark.parametrize("bits", [3, 2])
def test_the_default_beats_the_old_default_on_the_trained_model(perplexities, bits):
    new, old = perplexities[bits, "default"][0], perplexities[bits, "old"][0]
    print(f"\nw{bits} g128 held-out perplexity: float {new['perplexity_before']:.4f}, "
          f"default {new['perplexity_after']:.4f}, old default {old['perplexity_after']:.4f}")
    assert new["perplexity_before"] == old["perplexity_before"]
    assert new["perplexity_after"] < old["perplexity_after"]


def test_the_default_checkpoint_keeps_groups_in_column_order(perplexities):
    _, work, store = perplexities[3, "default"]
    qc = json.loads((work / "out" / "config.json").read_text())["quantization_config"]
    assert (qc["desc_act"], qc["static_groups"]) == (True, True)
    tensors = open_checkpoints(store).load(0)
    for name in ARCHITECTURES["llama"].linears:
        g_idx = tensors[f"{name}.g_idx"]
        assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=g_idx.dtype) // 128), name
