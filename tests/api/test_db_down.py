"""The API while its database is unreachable: 503 with Retry-After, never 500."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from api.app import create_app
from quantfarm.settings import Settings
from storage.artifacts import LocalStore
from storage.db import Database, is_transient
from tests.api.conftest import RecordingDispatcher
from tests.support.servers import free_port


@pytest.fixture
def down_client(tmp_path):
    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing")  # nothing listens there
    app = create_app(Settings(home=tmp_path), db=db, dispatcher=RecordingDispatcher(), store=LocalStore(tmp_path / "store"))
    yield app.test_client()
    db.dispose()


@pytest.mark.parametrize("method,path", [("get", "/v1/jobs"), ("get", "/v1/jobs/job_x"), ("post", "/v1/jobs/job_x/cancel")])
def test_unreachable_database_is_503_with_retry_after(down_client, method, path):
    r = getattr(down_client, method)(path)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "2"
    assert r.get_json() == {"error": "service_unavailable", "message": "The database is unavailable; try again shortly.",
                            "details": {"retry_after_seconds": 2}}


def test_healthz_names_the_database(down_client):
    r = down_client.get("/healthz")
    assert r.status_code == 503 and r.get_json()["db"] == "down"


def test_only_connection_failures_count_as_transient(sqlite_url, pg_url):
    for url in (sqlite_url, pg_url):
        db = Database(url)
        with pytest.raises(sa.exc.DBAPIError) as err:
            with db.session() as s:
                s.execute(sa.text("SELECT * FROM no_such_table"))
        assert not is_transient(err.value)  # a bug or a missing migration is a 500, not "come back later"
        db.dispose()
    down = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(sa.exc.OperationalError) as err:
        down.ping()
    assert is_transient(err.value)


def test_run_retries_until_the_deadline_then_raises(monkeypatch):
    import storage.db as dbmod

    slept: list[float] = []
    monkeypatch.setattr(dbmod.time, "sleep", slept.append)
    clock = iter(range(0, 1000))
    monkeypatch.setattr(dbmod.time, "monotonic", lambda: next(clock) * 0.1)
    down = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x", retry_seconds=1.5)
    with pytest.raises(sa.exc.OperationalError):
        down.run(lambda s: s.execute(sa.text("SELECT 1")))
    assert slept == [0.1, 0.2, 0.4, 0.8]  # backoff doubles; the next wait would pass the deadline
