"""Streaming perplexity: the same layer-at-a-time walk, for the source and the quantized weights."""

from __future__ import annotations

import math

import torch

from workers.engine.activations import Spool
from workers.engine.checkpoint import Checkpoints
from workers.engine.methods import Method
from workers.engine.model import StreamedModel
from workers.engine.pipeline import batches_of, release_heap


@torch.no_grad()
def perplexity_pair(model: StreamedModel, method: Method, ckpt: Checkpoints, ids: torch.Tensor,
                    spool: Spool | None = None) -> tuple[float, float]:
    """Return (perplexity before, perplexity after) on ``ids`` reading each layer once.

    Both streams advance batch by batch, each input batch forgotten once it has
    run, so at any time the source and quantized activations are held once each
    plus one batch's output (not a whole third stream of outputs beside the
    inputs); they live in ``spool`` (default: RAM), whose files are removed at the end.
    """
    spool = spool or Spool()
    token_batches = batches_of(ids)
    try:
        before = model.capture_inputs(token_batches, spool)
        after = None  # the same batches as ``before`` until layer 0 has run
        for i in range(model.num_layers):
            layer = model.load_layer(i)
            source = model.inputs_for(i, before)
            before = model.forward_layer(layer, source, drain=after is not None)  # layer 0's inputs still feed ``after``
            method.apply(model.arch.at(i), layer, ckpt.load(i))
            after = model.forward_layer(layer, source if after is None else model.inputs_for(i, after), drain=True)
            del source
            model.release(layer)
            release_heap()
        nll_b, n = model.head_nll(before, token_batches)
        nll_a, _ = model.head_nll(after, token_batches)
    finally:
        spool.close()
    return math.exp(nll_b / n), math.exp(nll_a / n)
