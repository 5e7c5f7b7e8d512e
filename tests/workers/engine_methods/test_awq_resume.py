"""An AWQ job that crashes after a layer resumes from its checkpoints to byte-identical output."""

from __future__ import annotations

import pytest

from storage.artifacts import LocalStore
from tests.workers.engine_methods.helpers import CPU, awq_request, sha256_tree
from workers.engine.run import quantize


class Crash(Exception):
    pass


def test_awq_resume_after_crash_is_byte_identical(awq_run, tmp_path):
    whole = awq_run("llama", group_size=64)  # the uninterrupted run
    req = awq_request(whole.source, group_size=64)
    store = LocalStore(tmp_path / "ckpt")
    seen = []

    def crash_after_layer_0(report):
        seen.append((report.index, report.resumed))
        if report.index == 0:
            raise Crash("worker died after layer 0")

    with pytest.raises(Crash):
        quantize(req, store, tmp_path / "out-1", device=CPU, on_layer=crash_after_layer_0)
    assert seen == [(0, False)]
    assert not (tmp_path / "out-1" / "model.safetensors").exists()

    # Resume on the same checkpoint store into a fresh directory, as another worker would.
    res = quantize(req, store, tmp_path / "out-2", device=CPU, on_layer=lambda r: seen.append((r.index, r.resumed)))
    assert res.layers_replayed == [0] and res.layers_computed == [1]  # at most one layer's work is redone
    assert seen[1:] == [(0, True), (1, False)]

    want, got = sha256_tree(whole.out), sha256_tree(tmp_path / "out-2")
    assert sorted(got) == sorted(want)
    assert got == want
    # The layer checkpoints themselves are the same bytes too.
    for name in ("layer-00000.safetensors", "layer-00001.safetensors"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (whole.ckpt / name).read_bytes()


def test_awq_resume_with_changed_options_fails_closed(awq_run, tmp_path):
    from quantfarm.errors import CheckpointMismatch
    from storage.artifacts import LocalStore as Store

    whole = awq_run("llama", group_size=64)
    with pytest.raises(CheckpointMismatch) as err:
        quantize(awq_request(whole.source, group_size=128), Store(whole.ckpt), tmp_path / "out", device=CPU)
    assert err.value.details["changed"] == ["method.options.group_size"]
    assert not (tmp_path / "out").exists()
