"""Passes over one decoder layer that stop early and reuse outputs already known.

With ``true_sequential`` GPTQ needs, for each group of linears in turn, the
inputs that group sees once the groups before it are quantized. Running the
whole layer for every group costs one full forward per group. A ``LayerWalk``
instead stops each batch as soon as the watched linear has its input, and once
a linear that ends a sub-module (``o_proj`` ends ``self_attn``, ``down_proj``
ends ``mlp``) is quantized, it serves that sub-module's output from the stored
input instead of recomputing it. The quantization passes then cost about one
forward in all, and the final pass (the next layer's inputs) only adds norms
and residuals.

Every value is produced by the same modules, on the same tensors, as a plain
forward with the quantized weights, so the next layer's inputs are bit for bit
what a replayed checkpoint computes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from workers.engine.activations import Activations


class _Stop(Exception):
    """Ends one batch's pass once the walk has what it came for."""


def _bare(output: Any) -> bool:
    """Whether ``output`` is a tensor, or a tuple of one tensor followed only by Nones."""
    if isinstance(output, torch.Tensor):
        return True
    return isinstance(output, tuple) and len(output) > 0 and isinstance(output[0], torch.Tensor) and all(o is None for o in output[1:])


def replace_first(output: Any, value: torch.Tensor) -> Any:
    """Return ``output`` (a tensor, or a tuple led by one) with ``value`` in front."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


class LayerWalk:
    """Early-stopping, memoizing passes of one layer over its calibration batches."""

    def __init__(self, layer: nn.Module, inputs: Activations):
        self.layer = layer
        self.inputs = inputs
        self.memo: dict[str, Activations] = {}  # sub-module name -> its output, per batch
        self.batch = 0

    @contextlib.contextmanager
    def _memoized(self) -> Iterator[None]:
        saved = {}
        for name, outputs in self.memo.items():
            module = self.layer.get_submodule(name)
            saved[name] = module.forward
            module.forward = lambda *_a, _outs=outputs, **_k: _outs[self.batch]
        try:
            yield
        finally:
            for name, fwd in saved.items():
                self.layer.get_submodule(name).forward = fwd

    @torch.no_grad()
    def watch(
        self, linear: str, on_input: Callable[[torch.Tensor], None], *, until_output_of: str | None = None,
        keep_output_of: str | None = None,
    ) -> list[Any]:
        """Feed ``linear``'s input of every batch to ``on_input``.

        Each batch stops right after that, or, with ``until_output_of``, once that
        sub-module returned; its outputs are returned per batch. When the first
        batch shows that the sub-module returns only its tensor (or a tuple led
        by it and otherwise None, as attention without weights does), the rest
        stop at the linear's input as well and get that shape back: their float
        output would be replaced by the quantized linear's anyway.

        With ``keep_output_of``, a module that runs before the linear (the norm
        that feeds it) has its output of every batch kept, and the later passes
        read it instead of computing it again: nothing it depends on changes
        after this pass, since groups are quantized in execution order.
        """
        outputs: list[Any] = []
        shape: list[Any] = []  # the first batch's output, once it is known to carry nothing else

        def pre(_m, args):
            on_input(args[0])
            if until_output_of is None or shape:
                raise _Stop

        def post(_m, _args, out):
            outputs.append(out)
            if not shape and _bare(out):
                shape.append(out)
            raise _Stop

        def stopped() -> None:
            if len(outputs) <= self.batch and until_output_of is not None:
                outputs.append(shape[0])  # stopped at the linear: only the shape is needed

        handles = [self.layer.get_submodule(linear).register_forward_pre_hook(pre)]
        if until_output_of is not None:
            handles.append(self.layer.get_submodule(until_output_of).register_forward_hook(post))
        kept = Activations(self.inputs.spool)
        if keep_output_of is not None:
            handles.append(self.layer.get_submodule(keep_output_of).register_forward_hook(lambda _m, _a, out: kept.append(out)))
        self._each_batch(handles, linear, stopped)
        if keep_output_of is not None and len(kept) == len(self.inputs):
            self.memo[keep_output_of] = kept
        else:
            kept.release()
        return outputs

    @torch.no_grad()
    def collect(self, hooks: dict[str, Callable[[torch.Tensor], None]], stop_after: str) -> None:
        """Feed each named linear's input to its hook, every batch ending once ``stop_after`` returned."""

        def stop(_m, _a, _o):
            raise _Stop

        handles = [self.layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, f=f: f(a[0])) for n, f in hooks.items()]
        handles.append(self.layer.get_submodule(stop_after).register_forward_hook(stop))
        self._each_batch(handles, stop_after)

    def _each_batch(self, handles: list, stopper: str, on_stop: Callable[[], None] | None = None) -> None:
        """Run every batch through the layer until a hook raises _Stop (then ``on_stop``); remove ``handles`` after.

        Raises RuntimeError when a batch runs to the end without ``stopper`` stopping it.
        """
        try:
            with self._memoized():
                for self.batch, (hidden, kwargs) in enumerate(self.inputs):
                    try:
                        self.layer(hidden, **kwargs)
                    except _Stop:
                        if on_stop is not None:
                            on_stop()
                        continue
                    raise RuntimeError(f"{stopper} never ran in this layer's forward")
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def finish(self) -> Activations:
        """Run every batch to the end (memoized sub-modules are not recomputed), kept as the inputs are."""
        outs = Activations(self.inputs.spool)
        with self._memoized():
            for self.batch, (hidden, kwargs) in enumerate(self.inputs):
                o = self.layer(hidden, **kwargs)
                outs.append((o[0] if isinstance(o, tuple) else o, kwargs))
        self.release()
        return outs

    def release(self) -> None:
        """Drop the memoized outputs (``finish`` does, or a walk whose layer's outputs are not needed)."""
        for memo in self.memo.values():
            memo.release()
        self.memo.clear()
