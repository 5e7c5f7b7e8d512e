"""Fixtures for the AWQ and bitsandbytes tests: tiny random models built locally (the Hub is unreachable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.models import make_tiny_model
from tests.workers.engine_methods.helpers import CPU, awq_request, bnb_request, perturb


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory, tokenizer_dir):
    """Build (once per session) a tiny model of an architecture, with random biases and norm weights."""
    built = {}

    def get(arch: str, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in built:
            d = tmp_path_factory.mktemp(f"src-{arch}")
            built[key] = perturb(make_tiny_model(d / "model", arch, tokenizer_dir=tokenizer_dir, **kw))
        return built[key]

    return get


@dataclass
class EngineRun:
    """One finished engine run (AWQ, or bitsandbytes with ``ckpt`` None)."""

    source: Path
    ckpt: Path
    out: Path
    req: Any  # QuantizeRequest
    result: Any  # EngineResult


@pytest.fixture(scope="session")
def awq_run(tmp_path_factory, tiny_source):
    """Quantize a tiny model with AWQ once per (architecture, options) and share the result."""
    from storage.artifacts import LocalStore
    from workers.engine.run import quantize

    runs = {}

    def get(arch: str, **options) -> EngineRun:
        key = (arch, tuple(sorted(options.items())))
        if key not in runs:
            d = tmp_path_factory.mktemp(f"awq-{arch}")
            src = tiny_source(arch)
            req = awq_request(src, **options)
            res = quantize(req, LocalStore(d / "ckpt"), d / "out", device=CPU)
            runs[key] = EngineRun(src, d / "ckpt", d / "out", req, res)
        return runs[key]

    return get


@pytest.fixture(scope="session")
def bnb_run(tmp_path_factory, tiny_source):
    """Quantize the tiny Llama with bitsandbytes once per (method, options, evaluate) and share the result."""
    from storage.artifacts import LocalStore
    from workers.engine.run import quantize

    runs = {}

    def get(method: str, *, evaluate: bool = False, **options) -> EngineRun:
        key = (method, evaluate, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in runs:
            d = tmp_path_factory.mktemp(f"bnb-{method}")
            req = bnb_request(tiny_source("llama"), method, evaluate=evaluate, **options)
            stages = []
            res = quantize(req, LocalStore(d / "ckpt"), d / "out", device=CPU, on_stage=stages.append)
            res.metrics["_stages"] = stages
            runs[key] = EngineRun(req.source_dir, None, d / "out", req, res)
        return runs[key]

    return get


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run these tests on one torch thread: the machine's two cores are shared, and the
    tiny ops of a tiny model wait far longer on a busy second thread than they gain."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
