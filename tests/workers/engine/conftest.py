"""Models the engine tests share: tiny random ones per architecture, built once per session.

The Hugging Face Hub is unreachable here, so every model is built locally with
``save_pretrained`` (tests/support/models.py) from the shared trained tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the engine tests on one torch thread.

    The models are tiny and the machine's two cores are shared: under load, two
    OpenMP threads spin against other processes and run several times slower than one.
    Module scope, so test modules elsewhere get their thread count back.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """``tiny_model(arch, layers=2, shard=None, **config)``: the path of a random tiny model, built once per session."""
    from tests.support.models import make_tiny_model

    built: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(arch: str = "llama", *, layers: int = 2, shard: str | None = None, **config) -> Path:
        key = (arch, layers, shard, *sorted((k, repr(v)) for k, v in config.items()))  # lists (mlp_only_layers) too
        if key not in built:
            name = f"{arch}-l{layers}" + (f"-{shard}" if shard else "") + "".join(f"-{k}{v}" for k, v in sorted(config.items())).replace(" ", "")
            built[key] = make_tiny_model(root / name, arch, tokenizer_dir=tokenizer_dir, shard=shard, layers=layers, **config)
        return built[key]

    return get


@pytest.fixture(scope="session")
def trained_model():
    """The trained 4-layer Llama (tests/support/trained.py), cached under the test cache dir."""
    from tests.conftest import CACHE
    from tests.support.trained import trained_llama

    return trained_llama(CACHE)
