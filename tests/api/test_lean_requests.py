"""What keeps requests cheap: a 1 s health memo, reads without BEGIN/COMMIT, a ping only for idle connections."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from storage.db import Database
from tests.api.conftest import MINIMAL, RecordingDispatcher, make_app


class CountingDispatcher(RecordingDispatcher):
    def __init__(self, up: bool = True):
        super().__init__()
        self.pings = 0
        self.up = up

    def ping(self) -> bool:
        self.pings += 1
        if not self.up:
            raise ConnectionRefusedError("broker down")
        return True


def test_healthz_is_checked_at_most_once_a_second(sqlite_url, store, tmp_path, monkeypatch):
    import api.service as service

    clock = [100.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    db = Database(sqlite_url)
    broker = CountingDispatcher()
    client = make_app(db, store, broker, tmp_path).test_client()
    for _ in range(5):
        assert client.get("/healthz").status_code == 200
    assert broker.pings == 1
    broker.up = False
    clock[0] += 0.9
    assert client.get("/healthz").status_code == 200 and broker.pings == 1  # still the memo
    clock[0] += 0.2
    r = client.get("/healthz")
    assert (r.status_code, r.get_json()["broker"], r.headers["Retry-After"], broker.pings) == (503, "down", "2", 2)
    db.dispose()


@pytest.fixture
def statements(monkeypatch):
    """Every statement psycopg sends, BEGIN and COMMIT included."""
    sent: list[str] = []
    execute, command = psycopg.Cursor.execute, psycopg.Connection._exec_command

    def spy_execute(self, query, *a, **k):
        sent.append(str(query).split()[0].upper())
        return execute(self, query, *a, **k)

    def spy_command(self, cmd, *a, **k):
        sent.append((cmd.decode() if isinstance(cmd, bytes) else str(cmd)).split()[0].upper())
        return command(self, cmd, *a, **k)

    monkeypatch.setattr(psycopg.Cursor, "execute", spy_execute)
    monkeypatch.setattr(psycopg.Connection, "_exec_command", spy_command)
    return sent


def test_reads_send_only_their_selects(pg_url, store, tmp_path, statements):
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    client = make_app(db, store, RecordingDispatcher(), tmp_path).test_client()
    job_id = client.post("/v1/jobs", json=MINIMAL).get_json()["id"]
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs?limit=20"):
        client.get(path)
        statements.clear()
        assert client.get(path).status_code == 200
        assert statements == ["SELECT", "SELECT"], path  # the job(s), their artifacts: no BEGIN, COMMIT or ping
    statements.clear()
    assert client.post("/v1/jobs", json=MINIMAL).status_code == 201
    assert statements[0] == "BEGIN" or statements[1] == "BEGIN"
    assert statements[-1] == "COMMIT"
    db.dispose()


def test_an_idle_connection_is_pinged_and_replaced_when_dead(pg_url, monkeypatch):
    import storage.db as dbmod

    clock = [1000.0]
    monkeypatch.setattr(dbmod.time, "monotonic", lambda: clock[0])
    db = Database(pg_url)
    with db.read() as s:
        pid = s.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    with db.read() as s:  # in steady use: no ping, same connection
        assert s.execute(sa.text("SELECT pg_backend_pid()")).scalar() == pid
    from tests.conftest import _admin_exec

    _admin_exec(f"SELECT pg_terminate_backend({pid})")  # as a database restart would
    clock[0] += 5  # idle: the checkout pings, finds it dead and takes a fresh connection
    with db.read() as s:
        assert s.execute(sa.text("SELECT pg_backend_pid()")).scalar() != pid
    db.dispose()
