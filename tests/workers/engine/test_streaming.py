"""The engine reads and holds one decoder layer at a time.

Two instruments, neither a timing: every tensor read from the safetensors shards is
recorded with the engine's phase at that moment (by wrapping ``ShardReader``), and
at every module call the number of decoder-layer parameters that are materialized
(not on ``meta``) is counted (by forward pre-hooks on the streamed skeleton).
"""

from __future__ import annotations

import pytest
import torch

from tests.workers.engine.helpers import run_job
from workers.engine.model import StreamedModel
from workers.engine.shards import ShardReader

LAYERS = 4


@pytest.fixture
def source(tiny_model):
    return tiny_model("llama", layers=LAYERS, shard="300KB")


class Recorder:
    """Tensor reads by phase; peaks of materialized parameters at module calls and layer loads."""

    def __init__(self):
        self.phase = "prepare"
        self.reads: list[tuple[str, tuple[str, ...]]] = []
        self.models: list[StreamedModel] = []
        self.peak_layers = 0  # decoder layers holding real weights at once
        self.peak_layer_params = 0
        self.outside_when_layer_live: set[str] = set()  # non-layer modules live while a layer is

    def record(self, names) -> None:
        self.reads.append((self.phase, tuple(names)))

    def watch(self, model: StreamedModel) -> None:
        self.models.append(model)
        for module in model.model.modules():
            module.register_forward_pre_hook(lambda *_: self.measure(model))

    def measure(self, model: StreamedModel) -> None:
        live = [sum(p.numel() for p in layer.parameters() if p.device.type != "meta") for layer in model.layers]
        n_live = sum(1 for n in live if n)
        self.peak_layers = max(self.peak_layers, n_live)
        self.peak_layer_params = max(self.peak_layer_params, sum(live))
        if n_live:
            layer_names = {f"{model.arch.layers}.{i}" for i in range(model.num_layers)}
            for name, p in model.model.named_parameters():
                if p.device.type != "meta" and not any(name.startswith(n + ".") for n in layer_names):
                    self.outside_when_layer_live.add(name)

    def names_in(self, phase: str) -> list[str]:
        return [n for ph, names in self.reads if ph == phase for n in names]


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    get, load_prefix, init = ShardReader.get, ShardReader.load_prefix, StreamedModel.__init__
    capture, load_layer = StreamedModel.capture_inputs, StreamedModel.load_layer

    def traced_get(self, name):
        rec.record([name])
        return get(self, name)

    def traced_load_prefix(self, prefix, *, strip=True):
        out = load_prefix(self, prefix, strip=strip)
        rec.record([prefix + k if strip else k for k in out])
        return out

    def traced_init(self, *a, **kw):
        init(self, *a, **kw)
        rec.watch(self)

    def traced_capture(self, batches, spool=None):
        rec.phase = "capture"
        return capture(self, batches, spool)

    def traced_load_layer(self, i, overrides=None):
        rec.phase = f"layer {i}"
        layer = load_layer(self, i, overrides)
        rec.measure(self)
        return layer

    monkeypatch.setattr(ShardReader, "get", traced_get)
    monkeypatch.setattr(ShardReader, "load_prefix", traced_load_prefix)
    monkeypatch.setattr(StreamedModel, "__init__", traced_init)
    monkeypatch.setattr(StreamedModel, "capture_inputs", traced_capture)
    monkeypatch.setattr(StreamedModel, "load_layer", traced_load_layer)
    return rec


def _on_stage(rec: Recorder):
    def on_stage(stage: str) -> None:
        rec.phase = stage
    return on_stage


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def test_each_layer_reads_only_its_own_tensors(source, recorder, tmp_path):
    from storage.artifacts import LocalStore
    from tests.workers.engine.helpers import CPU, request
    from workers.engine.run import quantize

    reader = ShardReader(source)
    quantize(request(source, "gptq", bits=4, group_size=32), LocalStore(tmp_path / "ckpt"), tmp_path / "out",
             device=CPU, on_stage=_on_stage(recorder))

    assert recorder.names_in("calibrating") == []  # opening the model reads no tensor
    assert recorder.names_in("capture") == ["model.embed_tokens.weight"]
    for i in range(LAYERS):
        got = recorder.names_in(f"layer {i}")
        assert sorted(got) == reader.names(f"model.layers.{i}."), f"layer {i} read {got}"
    # Export streams tensor by tensor; no single read spans more than one layer.
    for phase, names in recorder.reads:
        assert len({_layer_of(n) for n in names if _layer_of(n) is not None}) <= 1, (phase, names)
    exported = recorder.names_in("exporting")
    assert "model.embed_tokens.weight" in exported and "lm_head.weight" in exported
    assert not any(n.endswith("_proj.weight") for n in exported)  # quantized linears come from checkpoints


@pytest.mark.parametrize("method,evaluate", [("gptq", True), ("rtn", False)])
def test_one_layer_materialized_at_a_time(source, recorder, tmp_path, method, evaluate):
    res, _ = run_job(source, tmp_path, method, evaluate=evaluate, bits=4, group_size=32)
    assert res.layers_total == LAYERS
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        one_layer = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).model.layers[0].parameters())
    assert recorder.peak_layers == 1
    assert recorder.peak_layer_params == one_layer
    assert recorder.outside_when_layer_live == set()  # embeddings and head are back on meta
    # Whatever ran, every module ended back on meta: nothing piles up across layers.
    for model in recorder.models:
        assert all(p.device.type == "meta" for p in model.model.parameters())


def _live_tensor_bytes() -> int:
    """Bytes of every distinct storage behind a live, non-meta tensor the garbage collector can see."""
    import gc

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        # plain tensors and parameters only: other tests' leftovers (FakeTensors and the like) have no data pointer
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def test_live_tensors_do_not_grow_with_depth(source, tmp_path):
    """At every layer boundary the same tensor bytes are alive: nothing of a finished layer is kept."""
    live: list[int] = []
    run_job(source, tmp_path, "gptq", bits=4, group_size=32, on_layer=lambda _r: live.append(_live_tensor_bytes()))
    assert len(live) == LAYERS
    # The next layer's inputs and nothing that piles up (after the last layer its own
    # outputs are still referenced until the loop ends: no next layer takes them over).
    assert live[1:-1] == live[:-2] and live[-1] <= 2 * live[0], live


_MMAP_PROBE = """
import ctypes, sys
import torch
from workers.engine.pipeline import _libc, configure_heap

libc = _libc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print("skip"); sys.exit(0)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2
if sys.argv[1:] == ["configure"]:
    configure_heap()
big = torch.empty(16 * 1024**2 // 4, dtype=torch.float32)
del big  # freeing a mmapped block raises glibc's dynamic threshold past 2 MiB; a fixed one stays
grown = []
for _ in range(3):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(2 * 1024**2 // 4, dtype=torch.float32)
    grown.append(libc.mallinfo2().hblkhd - before)
    del t
print(*grown)
"""


def test_large_allocations_are_mmapped_after_configure_heap():
    """Tensors of 1 MiB or more get their own mmap, so freeing one returns it to the OS at once.

    Probed in a fresh process, as a worker starts: the threshold only decides where memory comes
    from when the heap has no free block big enough, and a pytest process that has run other tests
    holds such blocks, so there the 2 MiB tensor may come from an old hole and the probe says nothing.
    """
    import subprocess
    import sys

    def probe(*args: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _MMAP_PROBE, *args], capture_output=True, text=True, timeout=120,
                             check=True)
        if out.stdout.strip() == "skip":
            pytest.skip("not glibc >= 2.33")
        return [int(x) for x in out.stdout.split()]

    assert all(g >= 2 * 1024**2 for g in probe("configure")), "a 2 MiB tensor came from the heap"
    assert probe() == [0, 0, 0], "without configure_heap the probe cannot tell (glibc's default changed?)"


_ARENA_PROBE = """
import sys, threading
from workers.engine.heap import _libc, configure_heap

libc = _libc()
if libc is None or not hasattr(libc, "malloc_stats"):
    print("skip"); sys.exit(0)
if sys.argv[1:] == ["configure"]:
    configure_heap()  # as workers/__main__.py does, before any other thread allocates

def job():  # a job's thread: small blocks (Python objects, shapes), as every forward makes
    kept = [bytearray(64 * 1024) for _ in range(64)]
    del kept

t = threading.Thread(target=job)
t.start()
t.join()
libc.malloc_stats()  # one "Arena N:" paragraph per arena, on stderr
"""


def test_a_jobs_thread_allocates_from_the_one_arena():
    """A worker runs its job on a thread of its own; glibc would give that thread an arena of 64 MiB heaps, where a
    real worker's layer tensors sat in free heap space until the layer's trim (bench/RESULTS.md, worker memory).
    ``configure_heap`` at the worker's start keeps every thread in the main arena. Probed in fresh processes."""
    import subprocess
    import sys

    def arenas(*args: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, *args], capture_output=True, text=True, timeout=120,
                             check=True)
        if out.stdout.strip() == "skip":
            pytest.skip("not glibc")
        return out.stderr.count("Arena ")

    assert arenas("configure") == 1
    assert arenas() >= 2, "without configure_heap the thread got no arena of its own (glibc's default changed?)"


def test_the_memory_estimate_knows_the_engines_batch_size():
    """quantfarm.memory (imported by the API, without torch) restates the engine's batch size and bounds; keep them equal."""
    from quantfarm import memory
    from quantfarm.settings import Settings
    from workers.engine import pipeline
    from workers.engine.methods import gptq

    assert memory.BATCH_TOKENS == pipeline.BATCH_TOKENS
    assert memory.STORED_INPUTS_MAX_BYTES == gptq.STORED_INPUTS_MAX_BYTES
    assert memory.ACTIVATIONS_RAM_BYTES == Settings.model_fields["activations_ram_bytes"].default


def test_evaluation_frees_each_input_batch_as_its_output_exists():
    """The evaluation walk drains its activations: when a layer runs batch j, the inputs of
    batches 0..j-1 are already gone (a list-to-list forward would hold every input beside the outputs)."""
    import weakref

    from workers.engine.activations import Activations, Spool
    from workers.engine.model import StreamedModel

    inputs = Activations(Spool())
    hidden = [torch.randn(2, 8, 16) for _ in range(4)]
    refs = [weakref.ref(h) for h in hidden]
    expect = [h * 2 for h in hidden]
    for h in hidden:
        inputs.append((h, {}))
    del hidden, h
    alive_at_call: list[int] = []

    class Double(torch.nn.Module):
        def forward(self, hidden):
            alive_at_call.append(sum(r() is not None for r in refs))
            return (hidden * 2,)

    outputs = StreamedModel.forward_layer(Double(), inputs, drain=True)
    assert alive_at_call == [4, 3, 2, 1]
    assert all(r() is None for r in refs) and len(inputs) == 0
    assert all(torch.equal(h, e) for (h, _), e in zip(outputs, expect))
