"""Fault-injection fixtures: a PostgreSQL cluster and Redis servers of the tests' own.

The tests restart and stop these, so they run on spare ports, never on the
machine's shared services. Every process a test starts is stopped when it ends,
also when it fails.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.servers import PgServer, RedisServer


@pytest.fixture(scope="session")
def own_pg():
    with PgServer() as pg:
        yield pg


@pytest.fixture
def own_db(own_pg):
    """A new, migrated database on ``own_pg``; its URL."""
    from storage.migrate import upgrade

    url = own_pg.create_database(f"qf_fault_{uuid.uuid4().hex[:10]}")
    upgrade(url)
    return url


@pytest.fixture
def own_redis():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def deep_llama(tokenizer_dir):
    """A 10-layer tiny Llama: enough layers to interrupt a job in the middle."""
    from tests.conftest import CACHE
    from tests.support.models import make_tiny_model

    return make_tiny_model(CACHE / "deep-llama-10", "llama", tokenizer_dir=tokenizer_dir, layers=10)
