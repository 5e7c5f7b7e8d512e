"""Streaming perplexity: the same layer-at-a-time walk, for the source and the quantized weights."""

from __future__ import annotations

import math

import torch

from workers.engine.checkpoint import Checkpoints
from workers.engine.methods import Method
from workers.engine.model import StreamedModel
from workers.engine.pipeline import batches_of, release_heap


@torch.no_grad()
def perplexity_pair(model: StreamedModel, method: Method, ckpt: Checkpoints, ids: torch.Tensor) -> tuple[float, float]:
    """Return (perplexity before, perplexity after) on ``ids`` reading each layer once."""
    token_batches = batches_of(ids)
    before = model.capture_inputs(token_batches)
    after = list(before)
    for i in range(model.num_layers):
        layer = model.load_layer(i)
        before = model.forward_layer(layer, model.inputs_for(i, before))
        method.apply(model.arch.at(i), layer, ckpt.load(i))
        after = model.forward_layer(layer, model.inputs_for(i, after))
        model.release(layer)
        release_heap()
    nll_b, n = model.head_nll(before, token_batches)
    nll_a, _ = model.head_nll(after, token_batches)
    return math.exp(nll_b / n), math.exp(nll_a / n)
