"""Crash, cancel and resume: the finished artifact is byte-identical to an uninterrupted run.

Crashes are injected in-process (an ``on_layer`` callback or a solver that raises);
the kill -9 of a real worker is the end-to-end test's job. Checkpoints go to a real
``LocalStore`` directory, as a worker's would.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from quantfarm.errors import CheckpointMismatch, JobCancelled, StorageUnavailable
from storage.artifacts import LocalStore
from tests.workers.engine.helpers import file_hashes, run_job
from workers.engine.methods.gptq import GPTQMethod

OPTIONS = dict(bits=4, group_size=32, sym=False, desc_act=True)
LAYERS = 4
K = 1  # the crash comes after layer K's checkpoint


class Crash(RuntimeError):
    pass


def stop_after(k: int, exc: Exception):
    seen = []

    def on_layer(report):
        seen.append((report.index, report.resumed))
        if report.index == k:
            raise exc

    on_layer.seen = seen
    return on_layer


@pytest.fixture(scope="module")
def source(tiny_model):
    return tiny_model("llama", layers=LAYERS, shard="300KB")


@pytest.fixture(scope="module")
def uninterrupted(source, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    res, _ = run_job(source, work, **OPTIONS)
    assert res.layers_computed == list(range(LAYERS)) and res.layers_replayed == []
    return work, res, file_hashes(work / "out"), file_hashes(work / "ckpt")


@pytest.fixture(scope="module")
def crashed(source, tmp_path_factory):
    """A checkpoint store left by a run that crashed after layer K (copied by each test)."""
    work = tmp_path_factory.mktemp("crashed")
    on_layer = stop_after(K, Crash("injected crash"))
    with pytest.raises(Crash):
        run_job(source, work, on_layer=on_layer, **OPTIONS)
    assert on_layer.seen == [(i, False) for i in range(K + 1)]
    assert not (work / "out").exists()  # nothing exported from a half-done job
    return work / "ckpt"


def copy_store(template, dest) -> LocalStore:
    shutil.copytree(template, dest)
    return LocalStore(dest)


def manifest_layers(store: LocalStore) -> list[int]:
    return sorted(int(i) for i in json.loads(store.get_bytes("manifest.json"))["layers"])


def test_crash_leaves_finished_layers(crashed, uninterrupted):
    store = LocalStore(crashed)
    assert manifest_layers(store) == list(range(K + 1))
    assert sorted(store.list("")) == ["layer-00000.safetensors", "layer-00001.safetensors", "manifest.json"]
    # A finished layer's checkpoint is already the final one.
    done = file_hashes(uninterrupted[0] / "ckpt")
    assert all(file_hashes(crashed)[k] == done[k] for k in ("layer-00000.safetensors", "layer-00001.safetensors"))


def test_resume_after_crash_is_byte_identical(source, crashed, uninterrupted, tmp_path):
    _, _, want, want_ckpt = uninterrupted
    store = copy_store(crashed, tmp_path / "ckpt")
    before = file_hashes(tmp_path / "ckpt")
    seen = []
    res, _ = run_job(source, tmp_path, store=store, on_layer=lambda r: seen.append((r.index, r.resumed, r.total)), **OPTIONS)
    assert res.layers_replayed == list(range(K + 1))
    assert res.layers_computed == list(range(K + 1, LAYERS))  # nothing finished is solved again
    assert seen == [(i, i <= K, LAYERS) for i in range(LAYERS)]
    assert file_hashes(tmp_path / "out") == want
    layer_files = lambda h: {k: v for k, v in h.items() if k != "manifest.json"}  # the manifest records timings
    assert layer_files(file_hashes(tmp_path / "ckpt")) == layer_files(want_ckpt)
    after = file_hashes(tmp_path / "ckpt")
    assert all(after[k] == v for k, v in before.items() if k != "manifest.json")  # replay never rewrites


def test_crash_inside_a_layer_redoes_only_that_layer(source, uninterrupted, tmp_path, monkeypatch):
    """A crash mid-solve of layer 2 (its q/k/v done, the rest not) costs exactly that layer."""
    calls = {"n": 0}
    real = GPTQMethod.solve_group

    def flaky(self, layer, group, H):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 2:  # layers 0 and 1 have 4 groups each; fail in layer 2's second
            raise Crash("killed mid-layer")
        return real(self, layer, group, H)

    monkeypatch.setattr(GPTQMethod, "solve_group", flaky)
    with pytest.raises(Crash):
        run_job(source, tmp_path, **OPTIONS)
    store = LocalStore(tmp_path / "ckpt")
    assert manifest_layers(store) == [0, 1]
    monkeypatch.setattr(GPTQMethod, "solve_group", real)
    res, _ = run_job(source, tmp_path, store=store, out=tmp_path / "out2", **OPTIONS)
    assert res.layers_replayed == [0, 1] and res.layers_computed == [2, 3]
    assert file_hashes(tmp_path / "out2") == uninterrupted[2]


def test_stray_layer_file_without_manifest_entry_is_redone(source, crashed, uninterrupted, tmp_path):
    """A crash between writing a layer file and the manifest leaves a file nothing points to."""
    store = copy_store(crashed, tmp_path / "ckpt")
    store.put_bytes(f"layer-{K + 1:05d}.safetensors", b"half written")
    res, _ = run_job(source, tmp_path, store=store, **OPTIONS)
    assert res.layers_computed == list(range(K + 1, LAYERS))
    assert file_hashes(tmp_path / "out") == uninterrupted[2]


def test_resume_of_a_finished_job_replays_everything(source, uninterrupted, tmp_path):
    store = copy_store(uninterrupted[0] / "ckpt", tmp_path / "ckpt")
    res, _ = run_job(source, tmp_path, store=store, **OPTIONS)
    assert res.layers_computed == [] and res.layers_replayed == list(range(LAYERS))
    assert file_hashes(tmp_path / "out") == uninterrupted[2]
    assert res.layer_losses == uninterrupted[1].layer_losses


def test_cancel_keeps_checkpoints_and_resume_finishes_identically(source, uninterrupted, tmp_path):
    k = 2
    on_layer = stop_after(k, JobCancelled("Cancelled by the user."))
    with pytest.raises(JobCancelled):
        run_job(source, tmp_path, on_layer=on_layer, **OPTIONS)
    store = LocalStore(tmp_path / "ckpt")
    assert manifest_layers(store) == list(range(k + 1))
    assert not (tmp_path / "out").exists()
    res, _ = run_job(source, tmp_path, store=store, **OPTIONS)
    assert res.layers_replayed == list(range(k + 1)) and res.layers_computed == [k + 1]
    assert file_hashes(tmp_path / "out") == uninterrupted[2]


def _assert_mismatch(err, changed: list[str]) -> None:
    e = err.value
    assert e.code == "checkpoint_mismatch"
    assert e.details["changed"] == changed
    assert f"changed: {', '.join(changed)}" in e.message and "Submit a new job" in e.message


def test_changed_spec_fails_closed(source, crashed, tmp_path):
    store = copy_store(crashed, tmp_path / "ckpt")
    before = file_hashes(tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatch) as err:
        run_job(source, tmp_path, store=store, **{**OPTIONS, "damp_percent": 0.05})
    _assert_mismatch(err, ["method.options.damp_percent"])
    assert file_hashes(tmp_path / "ckpt") == before  # nothing the old job made is lost
    assert not (tmp_path / "out").exists()


def test_changed_calibration_fails_closed(source, crashed, tmp_path):
    store = copy_store(crashed, tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatch) as err:
        run_job(source, tmp_path, store=store, calibration=dict(num_samples=6, seq_len=64), **OPTIONS)
    _assert_mismatch(err, ["calibration"])  # a digest of the token windows


def test_changed_source_file_fails_closed(source, crashed, tmp_path):
    changed_src = tmp_path / "src"
    shutil.copytree(source, changed_src)
    store = copy_store(crashed, tmp_path / "ckpt")
    # Rewrite one tensor of one shard with a value nudged by one float step.
    shard = max(changed_src.glob("model-*.safetensors"))
    tensors = load_file(shard)
    name = min(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = tensors[name].view(-1)[0].nextafter(tensors[name].view(-1)[0] + 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    before = file_hashes(tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatch) as err:
        run_job(changed_src, tmp_path, store=store, **OPTIONS)
    _assert_mismatch(err, [f"source_files.{shard.name}"])
    assert file_hashes(tmp_path / "ckpt") == before


def test_flipped_byte_in_source_fails_closed(source, crashed, tmp_path):
    changed_src = tmp_path / "src"
    shutil.copytree(source, changed_src)
    shard = min(changed_src.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor's data
    shard.write_bytes(bytes(data))
    store = copy_store(crashed, tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatch) as err:
        run_job(changed_src, tmp_path, store=store, **OPTIONS)
    _assert_mismatch(err, [f"source_files.{shard.name}"])


def test_corrupt_layer_checkpoint_fails_closed(source, crashed, tmp_path):
    store = copy_store(crashed, tmp_path / "ckpt")
    blob = bytearray(store.get_bytes("layer-00000.safetensors"))
    blob[-3] ^= 0xFF
    store.put_bytes("layer-00000.safetensors", bytes(blob))
    with pytest.raises(CheckpointMismatch) as err:
        run_job(source, tmp_path, store=store, **OPTIONS)
    assert err.value.code == "checkpoint_mismatch"
    assert "layer-00000.safetensors is corrupt" in err.value.message
    assert store.get_bytes("layer-00000.safetensors") == bytes(blob)  # left for a person to inspect
    assert manifest_layers(store) == list(range(K + 1))


def test_missing_layer_checkpoint_is_a_storage_error(source, crashed, tmp_path):
    store = copy_store(crashed, tmp_path / "ckpt")
    store.delete("layer-00001.safetensors")
    with pytest.raises(StorageUnavailable, match="layer-00001.safetensors is listed in the manifest but missing"):
        run_job(source, tmp_path, store=store, **OPTIONS)
