"""Activations spilled to scratch files: the same bytes as in RAM, files gone at the end and on failure.

The farm keeps a small job's activations in RAM (``activations_ram_bytes``); these
tests force every batch to disk (a bound of 0) and compare with the in-RAM run.
"""

from __future__ import annotations

import errno

import pytest
import torch

from quantfarm.spec import AWQOptions
from tests.workers.engine import helpers
from tests.workers.engine.helpers import file_hashes, run_job
from workers.engine.activations import Activations, Spool
from workers.fencing import disk_full

CALIBRATION = {"num_samples": 8, "seq_len": 64}  # 2 batches of 256 tokens (BATCH_TOKENS patched below)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    from workers.engine import pipeline

    monkeypatch.setattr(pipeline, "BATCH_TOKENS", 256)
    monkeypatch.setitem(helpers.OPTIONS, "awq", AWQOptions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_spilled_batch_reads_back_the_same_bytes(tmp_path, dtype):
    spool = Spool(tmp_path / "spool", ram_bytes=3 * 4 * 5 * 2)  # room for the first batch of a 2-byte dtype only
    seq = Activations(spool)
    batches = [torch.randn(3, 4, 5).to(dtype) for _ in range(3)]
    for b in batches:
        seq.append((b, {"mask": None}))
    assert spool.spilled == (3 if dtype == torch.float32 else 2)
    assert len(list((tmp_path / "spool").iterdir())) == spool.spilled
    for (got, kw), want in zip(seq, batches):
        assert got.dtype == dtype and got.shape == want.shape and kw == {"mask": None}
        assert torch.equal(got.view(torch.uint8) if dtype != torch.float32 else got, want.view(torch.uint8) if dtype != torch.float32 else want)
    assert torch.equal(seq[2][0], batches[2])
    drained = [t for t, _ in seq.drain()]
    assert len(seq) == 0 and list((tmp_path / "spool").iterdir()) == [] and spool.in_ram == 0
    assert all(torch.equal(a, b) for a, b in zip(drained, batches))
    spool.close()
    assert not (tmp_path / "spool").exists()


def test_without_a_folder_everything_stays_in_ram():
    spool = Spool(None, ram_bytes=0)
    seq = Activations(spool)
    t = torch.ones(2, 2)
    seq.append(t)
    assert seq[0] is t and spool.spilled == 0


def spilling(spill):
    """An ``on_layer`` that counts the spilled files alive at each layer boundary."""
    seen: list[int] = []

    def on_layer(_report):
        seen.append(sum(1 for p in spill.rglob("*") if p.is_file()) if spill.exists() else 0)

    on_layer.seen = seen
    return on_layer


@pytest.mark.parametrize("method, options", [
    ("gptq", {"bits": 4, "group_size": 32, "desc_act": True}),  # true_sequential: the walk's memos and stored inputs spill too
    ("gptq", {"bits": 4, "group_size": 32, "true_sequential": False}),
    ("awq", {"group_size": 32}),
], ids=["gptq-sequential", "gptq-one-pass", "awq"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma3: each layer kind has its own kwargs
def test_a_spilled_job_equals_the_same_job_in_ram(tiny_model, tmp_path, method, options, arch):
    source = tiny_model(arch, layers=3)
    ram, _ = run_job(source, tmp_path / "ram", method, calibration=CALIBRATION, evaluate=True, **options)
    spill = tmp_path / "scratch" / "activations"
    on_layer = spilling(spill)
    disk, _ = run_job(source, tmp_path / "disk", method, calibration=CALIBRATION, evaluate=True, spill=spill,
                      on_layer=on_layer, **options)
    assert file_hashes(tmp_path / "disk" / "out") == file_hashes(tmp_path / "ram" / "out")
    layers = lambda h: {k: v for k, v in h.items() if k != "manifest.json"}  # the manifest records timings
    assert layers(file_hashes(tmp_path / "disk" / "ckpt")) == layers(file_hashes(tmp_path / "ram" / "ckpt"))
    for key in ("perplexity_before", "perplexity_after"):
        assert disk.metrics[key] == ram.metrics[key]
    assert all(n >= 2 for n in on_layer.seen[:-1])  # the next layer's 2 batches were on disk at each boundary
    assert not spill.exists() or [p for p in spill.rglob("*") if p.is_file()] == []  # removed at the end


def test_a_spilled_resume_after_a_crash_is_byte_identical(tiny_model, tmp_path):
    source = tiny_model("llama", layers=4)
    options = {"bits": 4, "group_size": 32, "desc_act": True}
    run_job(source, tmp_path / "ram", calibration=CALIBRATION, **options)
    spill = tmp_path / "scratch" / "activations"

    def crash(report):
        if report.index == 1:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        run_job(source, tmp_path / "disk", calibration=CALIBRATION, spill=spill, on_layer=crash, **options)
    assert not spill.exists() or [p for p in spill.rglob("*") if p.is_file()] == []  # removed on failure too
    res, _ = run_job(source, tmp_path / "disk", calibration=CALIBRATION, spill=spill, **options)
    assert res.layers_replayed == [0, 1] and res.layers_computed == [2, 3]
    assert file_hashes(tmp_path / "disk" / "out") == file_hashes(tmp_path / "ram" / "out")


def test_a_full_scratch_disk_while_spilling_reads_as_a_full_disk(tiny_model, tmp_path, monkeypatch):
    """The runner answers ``scratch_full`` for any error a full disk caused (tests/faults/test_scratch_full.py)."""
    import builtins

    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".bin"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full)
    spill = tmp_path / "scratch" / "activations"
    with pytest.raises(OSError) as err:
        run_job(tiny_model("llama", layers=2), tmp_path, calibration=CALIBRATION, spill=spill, bits=4, group_size=32)
    assert disk_full(err.value)
    assert not spill.exists() or [p for p in spill.rglob("*") if p.is_file()] == []


def test_awqs_clip_sample_read_batch_by_batch_equals_every_kth_row_of_all(tmp_path):
    """The sample AWQ's clip search looks at: every k-th search row over all batches, as when they were concatenated."""
    from workers.engine.methods.awq_inputs import GroupInputs, heldout_masks

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, 16, generator=gen) for n in (3, 5, 2)]
    held = heldout_masks([(b, {}) for b in batches])
    spilled = Activations(Spool(tmp_path, ram_bytes=0))
    for b in batches:
        spilled.append(b)
    in_ram = GroupInputs(x=batches, held=held)
    flat = torch.cat([t.reshape(-1, 16) for t in in_ram.search_x()])
    for limit in (1, 9, 20, 512):
        want = flat[:: max(1, flat.shape[0] // limit)]
        assert torch.equal(in_ram.sample(limit), want)
        assert torch.equal(GroupInputs(x=spilled, held=held).sample(limit), want)


def test_a_shared_item_is_kept_once_and_dropped_by_its_owner(tmp_path):
    spool = Spool(tmp_path / "spool", ram_bytes=0)
    owner, reader = Activations(spool), Activations(spool)
    t = torch.randn(2, 3, 4)
    owner.append((t, "rest"))
    reader.append_shared(owner, 0)
    assert spool.spilled == 1 and torch.equal(reader[0], t) and reader.shapes() == [torch.Size([2, 3, 4])]
    reader.release()
    assert torch.equal(owner[0][0], t)  # still the owner's
    owner.release()
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_awq_records_the_attention_and_mlp_input_once(tiny_model, tmp_path, arch):
    """q/k/v read the attention's own input and gate/up the MLP's: one spilled file each per batch, not two."""
    from workers.engine.methods import LayerContext
    from workers.engine.methods.awq_inputs import gather_inputs
    from workers.engine.model import StreamedModel
    from workers.engine.pipeline import batches_of

    model = StreamedModel(tiny_model(arch, layers=2), torch.device("cpu"))
    spool = Spool(tmp_path / "spool", ram_bytes=0)
    ids = torch.randint(0, 200, (8, 64))
    inputs = model.capture_inputs(batches_of(ids), spool)
    batches, before = len(inputs), spool.spilled
    rec, outputs = gather_inputs(LayerContext(model, 0, model.load_layer(0), inputs))
    # Per batch: attention's call and output, o_proj's input, the MLP's call and output, down_proj's input, the layer's output.
    assert batches == 2 and spool.spilled - before == 7 * batches
    for group, inspect in (("self_attn.q_proj", "self_attn"), ("mlp.gate_proj", "mlp")):
        r = rec[group]
        for i, (_, args, kwargs, _) in enumerate(r.recorded()):
            hidden = args[0] if args else kwargs["hidden_states"]
            assert torch.equal(r.x[i], hidden), (group, inspect)
    for r in rec.values():
        r.release()
    outputs.release()
    inputs.release()
    assert list((tmp_path / "spool").iterdir()) == []
