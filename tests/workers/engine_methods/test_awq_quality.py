"""AWQ earns its keep: on a small trained Llama with activation outliers, 4-bit AWQ loses far less than RTN.

The model is tests/support/trained.py's Llama trained on stdlib sources (cached
under the test cache dir; the first run trains it). At its size it has no
activation outliers, and 4-bit damage there is at the noise level (about ±0.3 %
perplexity for every method; AWQ and RTN swap places with the group size and the
number of evaluation windows), so a perplexity comparison on it would be decided
by chance. Real LLMs do have outlier channels, and they are what AWQ is for. The
test gives the trained model some with a function-preserving edit: a few channels
of each norm feeding q/k/v and gate/up are multiplied by 16 and the matching
weight columns divided by 16 (a power of two, so the float model computes the same
logits bit for bit). RTN then rounds those shrunken columns coarsely while their
inputs are large; AWQ's activation-aware scales undo that.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantfarm.spec import AWQOptions, Calibration, Evaluation, RTNOptions
from storage.artifacts import LocalStore
from tests.workers.engine_methods.helpers import CPU, sample_ids
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize

FACTOR = 16.0
CHANNELS = 4  # per norm, per layer
FEEDS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


@pytest.fixture(scope="module")
def trained():
    from tests.conftest import CACHE
    from tests.support.trained import trained_llama

    return trained_llama(CACHE)


def with_outliers(src, dst):
    """Copy a Llama, moving a factor of 16 from a few input columns of each group into its norm."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm, linears in FEEDS:
            ch = torch.randperm(sd[p + norm + ".weight"].numel(), generator=gen)[:CHANNELS]
            sd[p + norm + ".weight"][ch] *= FACTOR
            for lin in linears:
                sd[p + lin + ".weight"][:, ch] /= FACTOR
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def outlier_model(trained, tmp_path_factory):
    return with_outliers(trained, tmp_path_factory.mktemp("outliers") / "model")


def _metrics(model_dir, method, options, tmp_path):
    req = QuantizeRequest(
        source_dir=model_dir, method=method, options=options, calibration=Calibration(num_samples=16, seq_len=128),
        evaluate=True, evaluation=Evaluation(max_windows=8),
    )
    tag = f"{method}-{options.model_dump_json()}".replace('"', "").replace(":", "=")
    return quantize(req, LocalStore(tmp_path / f"ckpt-{tag}"), tmp_path / f"out-{tag}", device=CPU).metrics


def test_outlier_edit_preserves_the_trained_model(trained, outlier_model):
    from transformers import AutoModelForCausalLM

    ids = sample_ids(1024, shape=(2, 64))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(outlier_model, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)
    norm = load_file(outlier_model / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    assert norm.abs().max() > 8 * norm.abs().median()  # a few channels now stand out


@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
def test_awq_4bit_beats_rtn_4bit_at_the_same_group_size(outlier_model, zero_point, tmp_path):
    awq = _metrics(outlier_model, "awq", AWQOptions(group_size=128, zero_point=zero_point), tmp_path)
    rtn = _metrics(outlier_model, "rtn", RTNOptions(bits=4, group_size=128, sym=not zero_point), tmp_path)
    print(f"\nperplexity: fp32 {awq['perplexity_before']:.3f}, awq w4g128 {awq['perplexity_after']:.3f}, "
          f"rtn w4g128 {rtn['perplexity_after']:.3f}")
    assert awq["perplexity_before"] == rtn["perplexity_before"]  # same model, same held-out windows
    assert awq["perplexity_after"] < rtn["perplexity_after"]
    # Not a rounding-noise win: AWQ keeps less than a quarter of RTN's loss.
    assert awq["perplexity_after"] - awq["perplexity_before"] < 0.25 * (rtn["perplexity_after"] - rtn["perplexity_before"])
