"""An importance matrix from a calibration pass: llama.cpp's imatrix, from our own streamed forward.

For every linear, the mean over calibration tokens of each input channel's squared
activation (what ``llama-imatrix`` stores, and the diagonal of GPTQ's Hessian up to a
factor). The k-quant search weighs each weight's error by its column's entry. Layers
are loaded one at a time, as the layer-wise methods do; the float model's own
activations feed every layer. The activations go through a ``Spool`` as the layer-wise
methods' do: in RAM up to the job's bound, in its scratch folder beyond.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.engine.activations import Spool
from workers.engine.model import StreamedModel
from workers.engine.pipeline import batches_of, configure_heap, release_heap


class _Accumulator:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        s = flat.square().sum(dim=0).cpu()
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

    def hook(self, name: str):
        def pre(_module, args, kwargs):
            self.add(name, args[0] if args else kwargs["input"])
        return pre

    def result(self) -> dict[str, np.ndarray]:
        return {n: (s / self.counts[n]).to(torch.float32).numpy() for n, s in self.sums.items()}


@torch.no_grad()
def collect_imatrix(source_dir, device: torch.device, ids: torch.Tensor, spool: Spool | None = None) -> dict[str, np.ndarray]:
    """Return source weight name (``model.layers.0.mlp.down_proj.weight``, ``lm_head.weight``) -> per-column mean square.

    The activations live in ``spool`` (default: RAM); its files are removed at the end, normally or not.
    """
    configure_heap()
    model = StreamedModel(source_dir, device)
    acc = _Accumulator()
    spool = spool or Spool()
    try:
        inputs = model.capture_inputs(batches_of(ids), spool)
        for i in range(model.num_layers):
            layer = model.load_layer(i)
            inputs = model.inputs_for(i, inputs)
            handles = [m.register_forward_pre_hook(acc.hook(f"{model.layer_prefix(i)}{n}.weight"), with_kwargs=True)
                       for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            try:
                inputs = model.forward_layer(layer, inputs, drain=True)
            finally:
                for h in handles:
                    h.remove()
                model.release(layer)
            release_heap()
        _head(model, acc, inputs)
    finally:
        spool.close()
    return acc.result()


def _head(model: StreamedModel, acc: _Accumulator, inputs) -> None:
    """The head's input (after the final norm) for every batch, when the head is a linear."""
    post = [model.materialize(p) for p in model.arch.post]
    try:
        *before, head = post
        if isinstance(head, nn.Linear):
            for hidden, _ in inputs:
                for m in before:
                    if m is not None:
                        hidden = m(hidden)
                acc.add(model.arch.post[-1] + ".weight", hidden)
    finally:
        for m in post:
            model.release(m)
