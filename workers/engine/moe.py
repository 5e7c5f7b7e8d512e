"""Mixture-of-experts blocks with one ``nn.Linear`` per expert, as checkpoints store them.

transformers keeps the experts of a sparse block as 3-D tensors; quantization needs
each expert's linears on their own, named as the checkpoint names them. The engine
swaps every sparse block for an ``UnfusedMoE`` that routes with the model's own
router and computes what the fused block computes. During calibration the block can
also send every token through every expert (``all_experts``) so that each expert
gets statistics, while the router still decides the block's output; it counts the
tokens the router sends each expert either way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers.activations import ACT2FN

from workers.engine.arch import Arch, MoESpec


class Expert(nn.Module):
    """One expert's gated MLP, its linears named as the checkpoint names them."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str], act):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            self.add_module(name, nn.Linear(i, o, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class UnfusedMoE(nn.Module):
    """A sparse block: the model's router, per-expert linears, an optional gated shared expert."""

    def __init__(self, fused: nn.Module, spec: MoESpec, config, act):
        super().__init__()
        n = getattr(config, spec.num_experts)
        hidden, inter = config.hidden_size, getattr(config, spec.intermediate)
        self.gate = fused.gate  # routing stays transformers' own
        self.experts = nn.ModuleList(Expert(hidden, inter, spec.linears, act) for _ in range(n))
        # The model's own shared expert (and its gate), under the names the checkpoint uses.
        self.shared_name = spec.shared_name if spec.shared else None
        self.shared_gate_name = spec.shared_gate if spec.shared else None
        for name in filter(None, (self.shared_name, self.shared_gate_name)):
            self.add_module(name, fused.get_submodule(name))
        self.all_experts = False
        self.counts = [0] * n

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        _, weights, index = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = torch.where(index == e)
            self.counts[e] += int(tokens.numel())
            if self.all_experts:  # statistics from every token; the output from the routed ones only
                y = expert(x)[tokens]
            elif tokens.numel():
                y = expert(x[tokens])
            else:
                continue
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
        if self.shared_name is not None:
            y = self.get_submodule(self.shared_name)(x)
            if self.shared_gate_name is not None:
                y = torch.sigmoid(self.get_submodule(self.shared_gate_name)(x)) * y
            out = out + y
        return out.reshape(shape)


def install(layers: nn.ModuleList, arch: Arch, config) -> None:
    """Replace every sparse layer's fused block with an ``UnfusedMoE`` (weights stay where the block's were)."""
    spec = arch.moe
    for i, layer in enumerate(layers):
        if not arch.sparse(i):
            continue
        fused = layer.get_submodule(spec.block)
        act = ACT2FN[config.hidden_act]
        device = next(iter(fused.gate.parameters())).device
        with torch.device(device):
            moe = UnfusedMoE(fused, spec, config, act)
        parent, _, name = spec.block.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, moe)


def unfuse_loaded(model: nn.Module, arch: Arch) -> nn.Module:
    """Turn a loaded transformers model's fused experts into ``UnfusedMoE`` blocks holding the same weights."""
    spec = arch.moe
    layers = model.get_submodule(arch.layers)
    fused = [layer.get_submodule(spec.block) for layer in layers]
    install(layers, arch, model.config)
    for i, (layer, block) in enumerate(zip(layers, fused)):
        if not arch.sparse(i):
            continue
        moe = layer.get_submodule(spec.block)
        for e, expert in enumerate(moe.experts):
            for name, weight in zip(spec.linears, _expert_weights(block.experts, e, spec)):
                getattr(expert, name).weight.data = weight.clone()
    return model


def _expert_weights(experts: nn.Module, e: int, spec: MoESpec) -> tuple[torch.Tensor, ...]:
    """Expert ``e``'s gate, up and down weights, from fused 3-D tensors or (already unfused by a library) linears."""
    if isinstance(experts, nn.ModuleList):
        return tuple(getattr(experts[e], n).weight.data for n in spec.linears)
    gate, up = experts.gate_up_proj.data[e].chunk(2, dim=0)
    return gate, up, experts.down_proj.data[e]


def blocks(layer: nn.Module) -> list[tuple[str, UnfusedMoE]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, UnfusedMoE)]


@contextlib.contextmanager
def calibrating(layer: nn.Module, all_experts: bool) -> Iterator[None]:
    """Within: every sparse block of ``layer`` counts routed tokens from zero, and sends all tokens to all experts if asked."""
    found = blocks(layer)
    for _, m in found:
        m.all_experts, m.counts = all_experts, [0] * len(m.experts)
    try:
        yield
    finally:
        for _, m in found:
            m.all_experts = False


def routed_counts(layer: nn.Module) -> dict[str, list[int]]:
    """The tokens the router sent each expert since ``calibrating`` began, per block."""
    return {name: list(m.counts) for name, m in blocks(layer)}
