"""The compute dtype: bf16 for a bf16 source on a CPU that multiplies bf16 in hardware, float32 otherwise.

The capability probe is monkeypatched, so every branch runs on any CPU (bf16 runs
everywhere, only slower without AMX or AVX512-BF16). A resumed job keeps the
dtype its checkpoints were made in, whatever the resuming worker's CPU would pick.
"""

from __future__ import annotations

import json

import pytest
import torch

from storage.artifacts import LocalStore
from tests.workers.engine.helpers import file_hashes, run_job
from workers.engine import model as engine_model
from workers.engine.checkpoint import recorded_dtype
from workers.engine.model import compute_dtype, prefer_cpu_bf16

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OPTIONS = {"bits": 4, "group_size": 32, "sym": True, "desc_act": True}


class Crash(RuntimeError):
    pass


@pytest.fixture
def cpu_bf16(monkeypatch):
    """``cpu_bf16(True)``: the CPU probe says it multiplies bf16 in hardware; the setting is back to auto after."""
    def set_native(native: bool) -> None:
        monkeypatch.setattr(engine_model, "native_bf16", lambda: native)

    yield set_native
    prefer_cpu_bf16(None)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_follows_source_and_cpu_capability(cpu_bf16, native):
    cpu_bf16(native)
    assert compute_dtype(torch.bfloat16, CPU) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype(torch.float16, CPU) == torch.float32  # no fast fp16 path; bf16 would drop mantissa bits
    assert compute_dtype(torch.float32, CPU) == torch.float32
    assert compute_dtype(torch.bfloat16, CUDA) == torch.bfloat16
    assert compute_dtype(torch.float16, CUDA) == torch.float16
    assert compute_dtype(torch.float32, CUDA) == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_setting_overrides_the_probe(cpu_bf16, native):
    cpu_bf16(native)
    prefer_cpu_bf16(True)
    assert compute_dtype(torch.bfloat16, CPU) == torch.bfloat16
    assert compute_dtype(torch.float32, CPU) == torch.float32  # never for a float32 source
    prefer_cpu_bf16(False)
    assert compute_dtype(torch.bfloat16, CPU) == torch.float32
    prefer_cpu_bf16(None)
    assert compute_dtype(torch.bfloat16, CPU) == (torch.bfloat16 if native else torch.float32)


def recorded(store: LocalStore) -> dict:
    return json.loads(store.get_bytes("manifest.json"))["parts"]["compute"]


def test_float32_source_bytes_do_not_depend_on_the_cpu(tiny_model, cpu_bf16, tmp_path):
    source = tiny_model("llama")
    hashes = []
    for native in (True, False):
        cpu_bf16(native)
        _, store = run_job(source, tmp_path / str(native), **OPTIONS)
        assert recorded(store) == {"device": "cpu", "dtype": "torch.float32"}
        hashes.append(file_hashes(tmp_path / str(native) / "out"))
    assert hashes[0] == hashes[1]


@pytest.fixture(scope="module")
def bf16_source(tiny_model):
    return tiny_model("llama", layers=3, dtype=torch.bfloat16)


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_resume_keeps_the_recorded_dtype(bf16_source, cpu_bf16, tmp_path, first, then):
    """Checkpoints made on one kind of CPU, resumed on the other: same dtype, same bytes as never stopping."""
    want = torch.bfloat16 if first else torch.float32
    cpu_bf16(first)
    _, store = run_job(bf16_source, tmp_path / "whole", **OPTIONS)
    assert recorded(store)["dtype"] == str(want)

    def crash_after_first(report):
        if report.index == 0:
            raise Crash("stopped after layer 0")

    with pytest.raises(Crash):
        run_job(bf16_source, tmp_path / "job", on_layer=crash_after_first, **OPTIONS)
    cpu_bf16(then)  # another worker picks the job up
    store = LocalStore(tmp_path / "job" / "ckpt")
    assert recorded_dtype(store, CPU) == want and recorded_dtype(store, CUDA) is None
    res, _ = run_job(bf16_source, tmp_path / "job", store=store, **OPTIONS)
    assert res.layers_replayed == [0] and res.layers_computed == [1, 2]
    assert recorded(store)["dtype"] == str(want)
    assert file_hashes(tmp_path / "job" / "out") == file_hashes(tmp_path / "whole" / "out")


def test_no_checkpoints_no_recorded_dtype(tmp_path):
    assert recorded_dtype(LocalStore(tmp_path / "empty"), CPU) is None


def test_result_fingerprint_names_the_dtype_the_run_uses(bf16_source, cpu_bf16, tmp_path):
    """A resumed job computes in its checkpoints' dtype, so its reuse fingerprint must name that dtype, not the worker's."""
    from tests.workers.engine.helpers import request
    from workers.engine.run import result_fingerprint

    req = request(bf16_source, **OPTIONS)
    cpu_bf16(True)
    in_bf16 = result_fingerprint(req, CPU)
    cpu_bf16(False)
    in_float32 = result_fingerprint(req, CPU)
    assert in_bf16 != in_float32  # the dtype is part of what shapes the bytes

    def crash_after_first(report):
        if report.index == 0:
            raise Crash("stopped after layer 0")

    cpu_bf16(True)  # checkpoints made in bf16 ...
    with pytest.raises(Crash):
        run_job(bf16_source, tmp_path / "job", on_layer=crash_after_first, **OPTIONS)
    cpu_bf16(False)  # ... resumed by a worker that would compute in float32
    store = LocalStore(tmp_path / "job" / "ckpt")
    assert result_fingerprint(req, CPU, checkpoint_store=store) == in_bf16
    assert result_fingerprint(req, CPU, checkpoint_store=LocalStore(tmp_path / "none")) == in_float32  # nothing recorded
