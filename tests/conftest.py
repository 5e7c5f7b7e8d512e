"""Shared fixtures: real PostgreSQL and Redis on this machine, SQLite files, tiny models."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test reaches the real Hub: a Hub source or destination without the stand-in (tests/support/hubserver.py)
# goes to a closed loopback port (connection refused), in this process and every process a test starts.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")

PG_ADMIN = os.environ.get("QUANTFARM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# Each pytest-xdist worker (gw0, gw1, ...) gets a Redis database of its own (1, 2, ...): a test that flushes its
# broker, or a worker that takes a wake-up, must never touch another test process's.
_XDIST = os.environ.get("PYTEST_XDIST_WORKER", "")
REDIS_URL = os.environ.get("QUANTFARM_TEST_REDIS") or (
    f"redis://127.0.0.1:6379/{1 + int(_XDIST.removeprefix('gw'))}" if _XDIST.startswith("gw") else "redis://127.0.0.1:6379/0")
# The key ring of every test database (any process of a test that reads secrets sets QUANTFARM_SECRET_KEY to it).
TEST_SECRET_KEY = "quantfarm-test-secret-key-0001"


def pytest_collection_modifyitems(config, items):
    """Files marked ``trains`` first (a stable sort: every file stays whole), so that with two test processes the
    longest work starts at once instead of last."""
    items.sort(key=lambda item: item.get_closest_marker("trains") is None)


def test_keyring():
    """The key ring of TEST_SECRET_KEY (what a test's own Database objects encrypt with)."""
    from quantfarm.secrets import KeyRing

    return KeyRing([TEST_SECRET_KEY])


test_keyring.__test__ = False  # a helper, not a test
CACHE = Path(os.environ.get("QUANTFARM_TEST_CACHE", Path(__file__).resolve().parent.parent / "test-output" / "cache"))


def _admin_exec(sql: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(sql))
    eng.dispose()


@pytest.fixture(scope="session", autouse=True)
def local_roots(tmp_path_factory):
    """Let `local` model sources name the test models (under CACHE and pytest's temp folders), and nothing else.

    Set in the environment, so in-process ``Settings()`` and every spawned API and worker process see it.
    """
    roots = [CACHE.resolve(), tmp_path_factory.getbasetemp().resolve()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTFARM_LOCAL_ROOTS", ",".join(str(r) for r in roots))
        yield roots


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session, migrated to head."""
    from storage.migrate import upgrade

    name = f"qf_test_{uuid.uuid4().hex[:10]}"
    _admin_exec(f"CREATE DATABASE {name}")
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    _admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sqlite_url(tmp_path):
    from storage.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'quantfarm.db'}"
    upgrade(url)
    return url


def _truncate(db) -> None:
    from storage.models import Base

    with db.session() as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request, tmp_path):
    """A migrated, empty database: each test runs on PostgreSQL and on SQLite."""
    from quantfarm.secrets import KeyRing
    from storage.db import Database

    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else request.getfixturevalue("sqlite_url")
    database = Database(url, keyring=KeyRing([TEST_SECRET_KEY]))
    _truncate(database)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def tokenizer_dir():
    from tests.support.models import train_tokenizer

    return train_tokenizer(CACHE / "tokenizer")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir):
    """A 2-layer random Llama saved in sharded safetensors with the trained tokenizer."""
    from tests.support.models import make_tiny_model

    return make_tiny_model(CACHE / "tiny-llama", "llama", tokenizer_dir=tokenizer_dir, shard="300KB")
