"""true_sequential GPTQ through the early-stopping ``LayerWalk`` against the plain way.

The plain way runs one whole forward of the layer per group of linears, each with
the groups before it already quantized; the walk stops batches early and serves
finished sub-modules from stored inputs. Both must give the same codes and the
same next-layer inputs, bit for bit, on every architecture.
"""

from __future__ import annotations

import pytest
import torch

from quantfarm.spec import GPTQOptions
from workers.engine.methods import LayerContext, LayerOutput, method_for
from workers.engine.methods.gptq import set_quantized
from workers.engine.model import StreamedModel
from workers.engine.pipeline import batches_of
from workers.engine.quant import HessianSum

CPU = torch.device("cpu")


def plain_sequential(method, model: StreamedModel, layer, inputs) -> LayerOutput:
    """One full forward per group, hooks on the group's first linear."""
    out = LayerOutput({})
    for group in model.arch.groups:
        h = HessianSum()
        hook = layer.get_submodule(group.names[0]).register_forward_pre_hook(lambda _m, a, h=h: h.add(a[0]))
        try:
            model.forward_layer(layer, inputs)
        finally:
            hook.remove()
        for name, res in method.solve_group(layer, group, h.H):
            method._store(out, name, res)
            set_quantized(layer, name, res.dequantize())
    out.next_inputs = model.forward_layer(layer, inputs)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
def test_the_walk_equals_one_forward_per_group(tiny_model, arch, desc_act, recompute, monkeypatch):
    """Also when the closing linears' inputs are computed again (over the bound) instead of kept, in 3 batches."""
    from workers.engine import pipeline
    from workers.engine.methods import gptq

    monkeypatch.setattr(pipeline, "BATCH_TOKENS", 64)
    if recompute:
        monkeypatch.setattr(gptq, "STORED_INPUTS_MAX_BYTES", 0)
    model = StreamedModel(tiny_model(arch), CPU)
    ids = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    inputs = model.capture_inputs(batches_of(ids))
    assert len(inputs) == 3
    passes = []
    real_watch = gptq.LayerWalk.watch
    monkeypatch.setattr(gptq.LayerWalk, "watch", lambda self, *a, **k: passes.append(1) or real_watch(self, *a, **k))
    method = method_for("gptq", GPTQOptions(bits=4, group_size=32, desc_act=desc_act, true_sequential=True))

    layer = model.load_layer(0)
    norms = {g.prev for g in model.arch.groups if g.prev is not None and g.prev not in model.arch.linears}
    computed = dict.fromkeys(norms, 0)
    for n in norms:  # count real computations (a memoized read replaces forward and does not get here)
        m = layer.get_submodule(n)
        m.forward = lambda *a, _real=m.forward, _n=n, **k: computed.__setitem__(_n, computed[_n] + 1) or _real(*a, **k)
    walked = method.quantize_layer(LayerContext(model, 0, layer, inputs))
    assert len(norms) == 2 and computed == dict.fromkeys(norms, len(inputs))  # each norm once a batch, then read back
    closers = sum(g.closes is not None for g in model.arch.groups)
    assert closers >= 1 and len(passes) == len(model.arch.groups) + (closers if recompute else 0)  # the second passes ran
    plain = plain_sequential(method, model, model.load_layer(0), inputs)

    assert walked.tensors.keys() == plain.tensors.keys() and len(walked.tensors) == 4 * len(model.arch.linears)
    for key, t in plain.tensors.items():
        assert torch.equal(walked.tensors[key], t), key
    assert walked.losses == plain.losses
    assert len(walked.next_inputs) == len(plain.next_inputs) == len(inputs)
    for (a, _), (b, _) in zip(walked.next_inputs, plain.next_inputs):
        assert torch.equal(a, b)
    # The groups really fed each other: without true_sequential the codes differ.
    parallel = method_for("gptq", GPTQOptions(bits=4, group_size=32, desc_act=desc_act, true_sequential=False))
    flat = parallel.quantize_layer(LayerContext(model, 0, model.load_layer(0), inputs))
    assert any(not torch.equal(flat.tensors[k], t) for k, t in plain.tensors.items())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_last_layer_computes_no_outputs(tiny_model, arch):
    """After the last layer nothing reads its outputs: the same codes and losses, no next inputs, and the last
    group's linear never runs (its inputs are all GPTQ needs)."""
    model = StreamedModel(tiny_model(arch), CPU)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs = model.capture_inputs(batches_of(ids))
    method = method_for("gptq", GPTQOptions(bits=4, group_size=32, true_sequential=True))
    last = model.arch.groups[-1].names

    def run(wants_next):
        layer = model.load_layer(0)
        runs = {n: 0 for n in last}
        for n in last:
            m = layer.get_submodule(n)
            m.forward = lambda *a, _real=m.forward, _n=n, **k: runs.__setitem__(_n, runs[_n] + 1) or _real(*a, **k)
        return method.quantize_layer(LayerContext(model, 0, layer, inputs, wants_next)), runs

    full, full_runs = run(True)
    bare, bare_runs = run(False)
    assert bare.next_inputs is None and len(full.next_inputs) == len(inputs)
    assert all(n >= len(inputs) for n in full_runs.values()) and bare_runs == dict.fromkeys(last, 0)
    assert bare.tensors.keys() == full.tensors.keys()
    for key, t in full.tensors.items():
        assert torch.equal(bare.tensors[key], t), key
    assert bare.losses == full.losses
