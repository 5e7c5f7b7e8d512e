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
    """Return (perplexity before, perplexity after) on ``ids`` reading each layer once.

    Both streams advance batch by batch in place, so at any time the source and
    quantized activations are held once each plus one batch's output (not a whole
    third stream of outputs beside the inputs); the values are the same.
    """
    token_batches = batches_of(ids)
    before = model.capture_inputs(token_batches)
    after = list(before)  # the same tensors until layer 0 replaces them
    for i in range(model.num_layers):
        layer = model.load_layer(i)
        advance(model, i, layer, before)
        method.apply(model.arch.at(i), layer, ckpt.load(i))
        advance(model, i, layer, after)
        model.release(layer)
        release_heap()
    nll_b, n = model.head_nll(before, token_batches)
    nll_a, _ = model.head_nll(after, token_batches)
    return math.exp(nll_b / n), math.exp(nll_a / n)


def advance(model: StreamedModel, i: int, layer: torch.nn.Module, states: list) -> None:
    """Replace each batch of ``states`` by layer ``i``'s output for it, dropping its input as soon as it is used."""
    for j in range(len(states)):
        hidden, kwargs = states[j]
        if model.layer_kwargs is not None:
            kwargs = model.layer_kwargs[i][j]
        states[j] = None
        o = layer(hidden, **kwargs)
        del hidden
        states[j] = (o[0] if isinstance(o, tuple) else o, kwargs)
