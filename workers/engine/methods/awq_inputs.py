"""What AWQ records of one float layer: each group's inputs, split into search and held-out windows."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.activations import Activations
from workers.engine.arch import LinearGroup
from workers.engine.methods.base import LayerContext

CLIP_TOKENS = 512  # tokens the clip search looks at
HELDOUT_EVERY = 4  # every 4th calibration window validates the searches instead of feeding them


@dataclass
class GroupInputs:
    """What one forward pass of the float layer recorded for a group of linears.

    ``held`` marks, per batch, the calibration windows (rows of dim 0) kept out of
    the searches: the chosen scales and clips are validated on them. None (or an
    input without a window dimension) means every row is searched on. The
    recordings are kept as the layer's activations are (``Activations``: in RAM
    up to the job's bound, spilled beyond); every use reads them batch by batch.
    """

    x: Sequence[torch.Tensor] = field(default_factory=list)  # input of the group's linears, per batch
    calls: Sequence[tuple] = field(default_factory=list)  # the inspected module's calls, as ``call_item`` makes them
    ref: Sequence[torch.Tensor] = field(default_factory=list)  # the inspected module's float output, per call
    held: list[torch.Tensor | None] = field(default_factory=list)  # bool [windows] per batch

    def rows(self, i: int, t: torch.Tensor, heldout: bool = False) -> torch.Tensor:
        """Batch ``i``'s search rows of ``t`` (or its held-out ones)."""
        mask = self.held[i] if i < len(self.held) else None
        if mask is None or t.dim() < 3 or t.shape[0] != mask.shape[0]:
            return t
        return t[mask.to(t.device) if heldout else ~mask.to(t.device)]

    def search_rows(self, i: int, shape: torch.Size) -> int:
        """How many rows ``rows`` keeps of batch ``i`` (of ``shape``) for the searches."""
        mask = self.held[i] if i < len(self.held) else None
        n = shape[:-1].numel()
        if mask is None or len(shape) < 3 or shape[0] != mask.shape[0]:
            return n
        return n // shape[0] * int((~mask).sum())

    def search_x(self) -> Iterator[torch.Tensor]:
        return (self.rows(i, t) for i, t in enumerate(self.x))

    def heldout_x(self) -> Iterator[torch.Tensor]:
        return (self.rows(i, t, heldout=True) for i, t in enumerate(self.x))

    def recorded(self) -> Iterator[tuple[int, tuple, dict, torch.Tensor]]:
        """(batch, args, kwargs, float output) of every recorded call of the inspected module."""
        for i, (item, r) in enumerate(zip(self.calls, self.ref)):
            yield (i, *call_of(item), r)

    def x_mean(self) -> torch.Tensor:
        total, n = 0, 0
        for t in self.search_x():
            total = total + t.reshape(-1, t.shape[-1]).float().abs().sum(0)
            n += t.numel() // t.shape[-1]
        return total / n

    def gram(self, heldout: bool = False) -> torch.Tensor:
        """``sum_t x_t x_tᵀ`` over the search tokens (or the held-out ones), in float32."""
        return gram_of(self.heldout_x() if heldout else self.search_x())

    def sample(self, limit: int = CLIP_TOKENS) -> torch.Tensor:
        """Every k-th search row over all batches (k: the rows over ``limit``), read batch by batch."""
        counts = [self.search_rows(i, shape) for i, shape in enumerate(shapes(self.x))]
        step, start, picked = max(1, sum(counts) // limit), 0, []
        for t, n in zip(self.search_x(), counts):
            picked.append(t.reshape(-1, t.shape[-1])[(-start) % step::step])
            start += n
        return torch.cat(picked)

    def release(self) -> None:
        """Forget the recordings (their spilled files go)."""
        for seq in (self.x, self.calls, self.ref):
            if isinstance(seq, Activations):
                seq.release()


def shapes(xs: Sequence[torch.Tensor]) -> list[torch.Size]:
    """Each batch's shape, without reading a spilled one back."""
    return xs.shapes() if isinstance(xs, Activations) else [t.shape for t in xs]


def call_item(args: tuple, kwargs: dict) -> tuple:
    """A recorded call as an ``Activations`` item: its hidden states first (so they can spill), the rest in RAM."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0], "arg", args[1:], kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return (kwargs["hidden_states"], "kw", args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
    return (torch.empty(0), "none", args, kwargs)


def call_of(item: tuple) -> tuple[tuple, dict]:
    """The (args, kwargs) ``call_item`` recorded."""
    hidden, where, args, kwargs = item
    if where == "arg":
        return (hidden, *args), kwargs
    if where == "kw":
        return args, {**kwargs, "hidden_states": hidden}
    return args, kwargs


def gram_of(xs: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum_t x_t x_tᵀ`` over every row of ``xs``, in float32."""
    G = None
    for t in xs:
        X = t.reshape(-1, t.shape[-1]).float()
        G = X.t() @ X if G is None else G.addmm_(X.t(), X)
    return G


def heldout_masks(inputs: list, every: int = HELDOUT_EVERY) -> list[torch.Tensor | None]:
    """Mark every ``every``-th calibration window (counted across batches) as held out.

    With a single window there is nothing to hold out: it is searched on and
    validated on alike.
    """
    sizes = [hidden.shape[0] if hidden.dim() >= 3 else 0 for hidden, _ in inputs]
    if sum(sizes) < 2 or 0 in sizes:
        return [None] * len(inputs)
    masks, start = [], 0
    for n in sizes:
        masks.append((torch.arange(start, start + n) % every) == every - 1)
        start += n
    return masks


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def gather_inputs(ctx: LayerContext) -> tuple[dict[str, GroupInputs], list]:
    """Run the float layer once, recording each group's input and its inspected module's calls and outputs.

    Groups whose inspected output is their own linear's (``linear_inspect``) keep
    only the input: their search needs nothing else. Also returns the float
    layer's outputs: the next layer's inputs.
    """
    layer, groups, spool = ctx.layer, ctx.arch.groups, ctx.inputs.spool
    held = heldout_masks(ctx.inputs)
    rec = {g.names[0]: GroupInputs(Activations(spool), Activations(spool), Activations(spool), held) for g in groups}
    handles = []
    for g in groups:
        r = rec[g.names[0]]
        if linear_inspect(g):
            handles.append(layer.get_submodule(g.names[0]).register_forward_pre_hook(lambda _m, a, r=r: r.x.append(a[0])))
            continue
        # The inspected module (attention, MLP) usually hands its own input to the group's linears: that
        # tensor is recorded once, with the call, and the group's input reads it from there.
        last: dict[str, weakref.ref] = {}

        def on_call(_m, a, k, r=r, last=last):
            item = call_item(a, k)
            r.calls.append(item)
            last["hidden"] = weakref.ref(item[0])

        def on_x(_m, a, r=r, last=last):
            called = last.pop("hidden", None)
            if called is not None and called() is a[0]:
                r.x.append_shared(r.calls, len(r.calls) - 1)
            else:
                r.x.append(a[0])

        inspect = layer.get_submodule(g.inspect)
        handles.append(inspect.register_forward_pre_hook(on_call, with_kwargs=True))
        handles.append(layer.get_submodule(g.names[0]).register_forward_pre_hook(on_x))
        handles.append(inspect.register_forward_hook(lambda _m, _a, out, r=r: r.ref.append(_first(out))))
    try:
        outputs = ctx.model.forward_layer(layer, ctx.inputs)
    finally:
        for h in handles:
            h.remove()
    return rec, outputs


def linear_inspect(group: LinearGroup) -> bool:
    """Whether the output AWQ measures for ``group`` is its single linear's own (o_proj, down_proj, fc1, fc2)."""
    return len(group.names) == 1 and (group.inspect or group.names[0]) == group.names[0]
