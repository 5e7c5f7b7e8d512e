"""Models shared by the end-to-end tests."""

import pytest


@pytest.fixture(scope="session")
def deep_llama(tokenizer_dir):
    """A 10-layer tiny Llama: enough layers to interrupt a job in the middle."""
    from tests.conftest import CACHE
    from tests.support.models import make_tiny_model

    return make_tiny_model(CACHE / "deep-llama-10", "llama", tokenizer_dir=tokenizer_dir, layers=10)
