"""What keeps requests cheap: a 1 s health memo, reads without BEGIN/COMMIT, a ping only for idle connections."""

from __future__ import annotations

import threading
import time

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


def test_a_stale_health_answer_is_checked_again_by_one_caller_while_the_others_keep_the_last():
    """A load balancer's probes never queue behind a slow check: only the first check of all is waited for."""
    import threading

    from api.service import HealthMemo

    memo = HealthMemo(ttl=0.0)  # every answer is stale at once
    assert memo.get(lambda: ({"status": "ok"}, 200)) == ({"status": "ok"}, 200)
    entered, release = threading.Event(), threading.Event()

    def slow_check():
        entered.set()
        release.wait(10)
        return {"status": "unavailable"}, 503

    checking = threading.Thread(target=memo.get, args=(slow_check,))
    checking.start()
    assert entered.wait(10)
    calls = []
    # While the slow check runs, another caller gets the last answer at once and runs no check of its own.
    assert memo.get(lambda: calls.append(1) or ({"status": "other"}, 200)) == ({"status": "ok"}, 200) and calls == []
    release.set()
    checking.join(10)
    assert memo.get(lambda: calls.append(1) or ({"status": "ok"}, 200)) == ({"status": "ok"}, 200) and calls == [1]
    assert memo._answer == ({"status": "ok"}, 200)


@pytest.fixture
def statements(monkeypatch):
    """Every statement psycopg sends from the test's thread, BEGIN and COMMIT included (not the LISTEN of the thread
    that hears job changes: storage/job_cache.py)."""
    sent: list[str] = []
    execute, command = psycopg.Cursor.execute, psycopg.Connection._exec_command
    mine = threading.current_thread()

    def spy_execute(self, query, *a, **k):
        if threading.current_thread() is mine:
            sent.append(str(query).split()[0].upper())
        return execute(self, query, *a, **k)

    def spy_command(self, cmd, *a, **k):
        if threading.current_thread() is mine:
            sent.append((cmd.decode() if isinstance(cmd, bytes) else str(cmd)).split()[0].upper())
        return command(self, cmd, *a, **k)

    monkeypatch.setattr(psycopg.Cursor, "execute", spy_execute)
    monkeypatch.setattr(psycopg.Connection, "_exec_command", spy_command)
    return sent


def _key(db, team: str, role: str) -> dict[str, str]:
    from storage import teams as team_store

    with db.session() as s:
        t = team_store.create_team(s, team)
        return {"Authorization": f"Bearer {team_store.create_key(s, t.id, role=role, name=role).key}"}


def test_each_read_is_one_statement_whatever_the_page_size(pg_url, store, tmp_path, statements):
    """GET one job and a page of jobs (their artifacts included) are one SELECT each, with auth on and real keys; a
    job whose rows this process keeps (storage/job_cache.py) is not read again: GET one reads nothing, a page reads
    its jobs' ids and statuses, and the rows of those not kept in a second SELECT."""
    import time
    from datetime import timedelta

    from storage.models import Artifact, utcnow
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    client = make_app(db, store, RecordingDispatcher(), tmp_path, auth="on").test_client()
    member, other, admin = _key(db, "t1", "member"), _key(db, "t2", "member"), _key(db, "t3", "admin")
    ids = [client.post("/v1/jobs", json=MINIMAL, headers=member).get_json()["id"] for _ in range(25)]
    t0 = utcnow()
    arts = {ids[3]: ["art_b1", "art_b2"], ids[20]: ["art_a1"]}  # ids[3] has two, made in this order
    with db.session() as s:
        for job_id, names in arts.items():
            for n, (name, kind) in enumerate(zip(names, ("model", "eval"))):
                s.add(Artifact(id=name, job_id=job_id, kind=kind, format="gptq", location="x", sha256="ab" * 32, file_count=1,
                               size_bytes=7, files=[], created_at=t0 + timedelta(seconds=n)))
    for who in (member, other, admin):
        client.get("/v1/jobs", headers=who)  # the first use of a key reads it and records its use
    began = time.monotonic()
    while not db.job_rows.live:  # the first lookup started the listener: from now on rows are kept
        assert time.monotonic() - began < 10
        time.sleep(0.02)
    newest_first = ids[::-1]

    for expected in (["SELECT"], []):  # read, then kept
        statements.clear()
        job = client.get(f"/v1/jobs/{ids[3]}", headers=member).get_json()
        assert statements == expected
        assert ([a["id"] for a in job["artifacts"]], job["artifacts"][0]["size_bytes"], job["status"]) == (["art_b1", "art_b2"], 7, "queued")
    statements.clear()
    assert client.get(f"/v1/jobs/{ids[3]}", headers=other).status_code == 404  # another team's job, kept or not
    assert statements == ["SELECT", "SELECT"]  # api/fastpath.py finds nothing and leaves the 404 to Flask, which reads again
    # The jobs kept grow page by page: (limit, caller, statements).
    for limit, who, expected in ((1, member, 2), (20, member, 2), (200, member, 2), (20, admin, 1), (200, member, 1)):
        statements.clear()
        page = client.get(f"/v1/jobs?limit={limit}", headers=who).get_json()
        assert statements == ["SELECT"] * expected, limit
        assert [j["id"] for j in page["items"]] == newest_first[:limit]
        assert page["next_cursor"] == (newest_first[limit - 1] if limit < 25 else None)
        assert {j["id"]: [a["id"] for a in j["artifacts"]] for j in page["items"] if j["artifacts"]} == \
            {k: v for k, v in arts.items() if k in newest_first[:limit]}
    statements.clear()
    rest = client.get(f"/v1/jobs?limit=20&cursor={newest_first[19]}&status=queued", headers=member).get_json()
    assert statements == ["SELECT"] and [j["id"] for j in rest["items"]] == newest_first[20:]
    assert client.get("/v1/jobs", headers=other).get_json() == {"items": [], "next_cursor": None}
    db.dispose()


def test_a_submit_is_one_statement_before_flask_and_two_round_trips_in_the_view(pg_url, store, tmp_path, statements,
                                                                               monkeypatch):
    """POST /v1/jobs before Flask (api/fastpath.py): one statement, autocommit, that stores the job, its event and the
    team's queued count only while the team is under its quota. Through the view: the quota (one SELECT), then the
    three INSERTs in one pipeline. No BEGIN or COMMIT of their own either way; with auth on and a real key."""
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    broker = RecordingDispatcher()
    client = make_app(db, store, broker, tmp_path, auth="on").test_client()
    member = _key(db, "t1", "member")
    client.post("/v1/jobs", json=MINIMAL, headers=member)  # the key's first use
    pipelines = []
    pipeline = psycopg.Connection.pipeline
    monkeypatch.setattr(psycopg.Connection, "pipeline", lambda self: pipelines.append(self.autocommit) or pipeline(self))
    for _ in range(3):
        statements.clear()
        assert client.post("/v1/jobs", json=MINIMAL, headers=member).status_code == 201
        assert statements == ["WITH"] and pipelines == [], (statements, pipelines)
        statements.clear()
        assert client.post("/v1/jobs?via=view", json=MINIMAL, headers=member).status_code == 201  # Flask's view
        assert statements == ["SELECT", "INSERT", "INSERT", "INSERT"] and pipelines == [True], (statements, pipelines)
        pipelines.clear()
    assert broker.jobs == []  # the inserts announce the jobs (storage/notices.py)
    with db.read() as s:
        assert s.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 7
        assert s.execute(sa.text("SELECT count(*) FROM job_events WHERE message = 'Job created'")).scalar() == 7
        assert s.execute(sa.text("SELECT sum(queued) FROM team_queued")).scalar() == 7
    db.dispose()


def test_a_read_session_is_made_only_when_a_check_uses_it(pg_url, store, tmp_path, monkeypatch):
    """``Database.read_when_needed`` (a submit's checks): no Session made for a local model's submit that needs no
    statement before it is stored (the fast path's); made at its first use and closed at the end otherwise (the
    view's quota check)."""
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    client = make_app(db, store, RecordingDispatcher(), tmp_path, auth="on").test_client()
    member = _key(db, "t1", "member")
    client.post("/v1/jobs", json=MINIMAL, headers=member)  # the key's first use
    made, closed = [], []
    readers = db.readers

    def counted():
        s = readers()
        made.append(s)
        monkeypatch.setattr(s, "close", lambda real=s.close: closed.append(s) or real())
        return s

    monkeypatch.setattr(db, "readers", counted)
    assert client.post("/v1/jobs", json=MINIMAL, headers=member).status_code == 201  # before Flask
    assert made == [] and closed == []
    assert client.post("/v1/jobs?via=view", json=MINIMAL, headers=member).status_code == 201  # the view: the quota
    assert len(made) == 1 and closed == made
    with db.read_when_needed() as s:
        assert s.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 3
    assert len(made) == 2 and closed == made
    db.dispose()


def test_a_submit_whose_event_fails_stores_no_job_and_wakes_no_worker(pg_url, store, tmp_path, monkeypatch):
    """The job and its event are one transaction: when the event's INSERT fails, the job's is rolled back too, and the
    workers hear of nothing (no broker message, no notice); each stored job is announced at its commit."""
    import storage.jobs as job_store
    from storage.notices import NewJobNotices
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    notices = NewJobNotices(db)
    assert notices.wait(5)  # listening
    broker = RecordingDispatcher()
    client = make_app(db, store, broker, tmp_path).test_client()
    assert client.post("/v1/jobs", json=MINIMAL).status_code == 201
    assert notices.wait(5)
    created = job_store._created_event
    monkeypatch.setattr(job_store, "_created_event", lambda job: {**created(job), "job_id": "job_no_such_job"})  # a foreign key violation
    r = client.post("/v1/jobs", json=MINIMAL)
    assert r.status_code == 500 and r.get_json()["error"] == "internal_error", r.get_data(as_text=True)
    assert not notices.wait(0.5)
    monkeypatch.setattr(job_store, "_created_event", created)
    assert client.post("/v1/jobs", json=MINIMAL).status_code == 201  # the pooled connection is fine afterwards
    assert notices.wait(5)
    with db.read() as s:
        assert s.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 2
        assert s.execute(sa.text("SELECT count(*) FROM job_events")).scalar() == 2
    assert broker.jobs == []
    notices.close()
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


def test_healthz_fast_path_answers_as_the_flask_view_does(sqlite_url, store, tmp_path):
    """GET /healthz skips Flask (api/fastpath.py); its bytes, status and headers equal the view's."""
    from tests.api.test_service import _parse_metrics

    db = Database(sqlite_url)
    broker = CountingDispatcher()
    client = make_app(db, store, broker, tmp_path).test_client()
    for up, status in ((True, 200), (False, 503)):
        broker.up = up
        client.application.extensions["quantfarm_health"]._at = float("-inf")  # a fresh check
        fast = client.get("/healthz")
        view = client.get("/healthz?via=view")  # a query string goes through Flask's routing and hooks
        assert fast.status == view.status and fast.status_code == status
        assert fast.get_data() == view.get_data()
        assert sorted(fast.headers.items()) == sorted(view.headers.items())
        assert fast.headers["X-Frame-Options"] == "DENY" and fast.headers["Content-Type"] == "application/json"
        assert ("Retry-After" in fast.headers) == (status == 503)
    assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 400  # the host allowlist still holds
    m = _parse_metrics(client.get("/metrics").get_data(as_text=True))
    counted = {code: m[("quantfarm_http_requests_total", (("code", code), ("method", "GET"), ("route", "/healthz")))]
               for code in ("200", "503")}
    assert counted == {"200": 2, "503": 2}
    db.dispose()


def test_a_read_on_a_connection_the_server_dropped_is_a_503_and_the_next_one_works(pg_url, store, tmp_path, monkeypatch):
    """GET one job and a page run on psycopg's own cursor: a dropped connection is still a 503, then replaced."""
    import storage.db as dbmod
    from tests.conftest import _admin_exec, _truncate

    monkeypatch.setattr(dbmod.time, "monotonic", lambda: 1000.0)  # never idle: no ping at checkout hides the drop
    db = Database(pg_url)
    _truncate(db)
    job_id = make_app(db, store, RecordingDispatcher(), tmp_path).test_client().post("/v1/jobs", json=MINIMAL).get_json()["id"]
    db.dispose()
    db = Database(pg_url)  # one pooled connection: the reads below are sequential
    client = make_app(db, store, RecordingDispatcher(), tmp_path).test_client()
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs?limit=5"):
        assert client.get(path).status_code == 200
        with db.read() as s:
            pid = s.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        _admin_exec(f"SELECT pg_terminate_backend({pid})")  # as a database restart would
        r = client.get(path)
        assert (r.status_code, r.headers["Retry-After"], r.get_json()["error"]) == (503, "2", "service_unavailable")
        r = client.get(path)
        assert r.status_code == 200 and job_id in r.get_data(as_text=True)
    db.dispose()


def test_lean_json_and_security_headers_answer_as_flask_would(sqlite_url, store, tmp_path):
    """api/app.py LeanJSON writes Flask's bytes; api/auth.py security_headers never doubles a header a response set."""
    from datetime import datetime, timezone

    from flask import Flask, Response
    from flask.json.provider import DefaultJSONProvider

    from api.auth import security_headers

    db = Database(sqlite_url)
    app = make_app(db, store, RecordingDispatcher(), tmp_path)
    plain = Flask("plain")
    plain.json = DefaultJSONProvider(plain)
    plain.json.sort_keys = False
    value = {"z": 1, "a": ["é", "✓", None, 2.5, True], "at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "n": {"b": {}}}
    with app.app_context():
        lean = app.json.response(value)
    with plain.app_context():
        flask_own = plain.json.response(value)
    assert lean.get_data() == flask_own.get_data() and lean.headers == flask_own.headers
    assert lean.get_data().startswith(b'{"z":1,"a":["\\u00e9"')

    own = security_headers(Response("<p>", content_type="text/html; charset=utf-8", headers={"x-frame-options": "SAMEORIGIN"}))
    assert own.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    assert own.headers["X-Content-Type-Options"] == "nosniff" and "frame-ancestors 'none'" in own.headers["Content-Security-Policy"]
    assert "Content-Security-Policy" not in security_headers(Response("{}", content_type="application/json")).headers
    db.dispose()


def test_a_pooled_connection_keeps_one_cursor_for_its_statements(pg_url):
    """Reads on one pooled connection run on the cursor kept with it (its dumpers and loaders looked up once); a fresh
    connection after the old one died gets a cursor of its own; a statement's error leaves the kept cursor usable."""
    from storage.lean import kept_cursor

    db = Database(pg_url)
    with db.connect_read() as conn:
        first = kept_cursor(conn)
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with db.connect_read() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid  # the same pooled connection
        assert kept_cursor(conn) is first
        with pytest.raises(psycopg.errors.DivisionByZero):
            first.execute("SELECT 1 / 0")
        first.execute("SELECT %(v)s::int + 1", {"v": 41})
        assert first.fetchall() == [(42,)]
    conn = db.reader.connect()
    conn.invalidate()  # as a dead connection found by a statement is
    conn.close()
    with db.connect_read() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid and kept_cursor(conn) is not first
    db.dispose()


def test_reads_return_their_connection_without_a_rollback_unless_a_transaction_is_open(pg_url, monkeypatch):
    """The readers' pool (autocommit) skips the reset's rollback at checkin; a connection on which a statement opened a
    transaction anyway is rolled back (what it wrote is gone) before the next checkout gets it."""
    from storage.lean import kept_cursor

    db = Database(pg_url)
    with db.connect_read() as conn:  # the first connect (SQLAlchemy's dialect set-up rolls back)
        conn.exec_driver_sql("SELECT 1")
    calls = []
    real = psycopg.Connection.rollback
    monkeypatch.setattr(psycopg.Connection, "rollback", lambda self: (calls.append(self), real(self))[1])
    with db.connect_read() as conn:  # as storage/lean.py reads (a Core connection's own autobegun work rolls back)
        kept_cursor(conn).execute("SELECT 1")
    assert calls == []
    monkeypatch.undo()
    with db.connect_read() as conn:
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("CREATE TABLE left_open (x int)")
    with db.connect_read() as conn:
        assert conn.connection.dbapi_connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.exec_driver_sql("SELECT to_regclass('left_open') IS NULL").scalar() is True
    db.dispose()


def test_the_process_keeps_its_reader_connection_while_it_reads_at_least_once_a_second(pg_url, monkeypatch):
    """``held_read``: back-to-back reads use one connection (one pool checkout), whichever thread runs them; unused a
    second it is pinged before its next use, and one that died meanwhile (a database restart) is replaced; a read that
    meets a connection dead within the second fails (a 503 for the caller) and the next one gets a fresh connection; a
    transaction left open is rolled back before the next use; ``dispose`` closes every kept one."""
    import threading

    import storage.db as dbmod
    from sqlalchemy import event

    from tests.conftest import _admin_exec

    clock = [1000.0]
    monkeypatch.setattr(dbmod.time, "monotonic", lambda: clock[0])
    db = Database(pg_url)
    checkouts = []
    event.listen(db.reader.pool, "checkout", lambda dbapi_conn, record, proxy: checkouts.append(dbapi_conn))

    def pid() -> int:
        with db.held_read() as conn:
            return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()

    first = pid()
    clock[0] += 0.5
    assert pid() == first and len(checkouts) == 1 and db.reader.pool.checkedout() == 1
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(pid()))
    t.start()
    t.join()
    assert other == [first] and len(checkouts) == 1  # another thread after it: the same warm connection
    clock[0] += 1.5  # unused a second and a half: pinged, alive, kept
    assert pid() == first and len(checkouts) == 1
    _admin_exec(f"SELECT pg_terminate_backend({first})")  # a database restart while the process sat idle
    clock[0] += 1.5
    second = pid()  # pinged: dead, so a fresh connection from the pool, and the read goes through
    assert second != first and len(checkouts) == 2
    _admin_exec(f"SELECT pg_terminate_backend({second})")  # as a database restart would, while in steady use
    clock[0] += 0.1
    with pytest.raises(sa.exc.OperationalError):
        pid()
    assert pid() not in (first, second)  # the dead one dropped; a fresh connection
    with db.held_read() as conn:
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("CREATE TABLE left_open (x int)")
    with db.held_read() as conn:  # the transaction left open was rolled back before the next use
        assert conn.connection.dbapi_connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.exec_driver_sql("SELECT to_regclass('left_open') IS NULL").scalar() is True
    assert len(checkouts) == 3
    db.dispose()
    assert db.reader.pool.checkedout() == 0 and db._held_all == set()


def test_kept_reader_connections_outlive_no_thread_and_shrink_after_a_burst(pg_url, monkeypatch):
    """Requests run on threads or greenlets that end with them (werkzeug's threads, gunicorn's gevent workers). Kept
    connections belong to the process: 12 short-lived threads reading one after another used one connection, not 12
    left checked out of the pool by threads that no longer exist (the pool holds 20). Uses at once take one each, the
    one put back last is handed out first, and once the burst is over a second, the next use returns the rest."""
    import threading

    import storage.db as dbmod

    clock = [1000.0]
    monkeypatch.setattr(dbmod.time, "monotonic", lambda: clock[0])
    db = Database(pg_url)

    def pid() -> int:
        with db.held_read() as conn:
            return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()

    seen: list[int] = []
    for _ in range(12):
        t = threading.Thread(target=lambda: seen.append(pid()))
        t.start()
        t.join()
    assert len(set(seen)) == 1 and db.reader.pool.checkedout() == 1
    first = seen[0]
    with db.held_read() as a, db.held_read() as b, db.held_read() as c:  # three at once: three connections
        burst = [x.exec_driver_sql("SELECT pg_backend_pid()").scalar() for x in (a, b, c)]
    assert burst[0] == first and len(set(burst)) == 3 and db.reader.pool.checkedout() == 3
    assert pid() == burst[0]  # put back last (the outermost use), handed out first
    clock[0] += 0.5
    assert pid() == burst[0] and db.reader.pool.checkedout() == 3  # within a second: all three kept
    clock[0] += 0.6  # the other two unused for 1.1 s: the next use returns the oldest, then the one after
    assert pid() == burst[0] and db.reader.pool.checkedout() == 2
    assert pid() == burst[0] and db.reader.pool.checkedout() == 1
    assert len(db._held_all) == 1
    db.dispose()
    assert db.reader.pool.checkedout() == 0 and db._held_all == set()


def test_more_reads_at_once_than_the_pool_holds_all_get_a_connection(pg_url, monkeypatch):
    """30 reads at once, each holding its connection 50 ms, on a reader pool of 20 with a 3 s checkout timeout (gunicorn's
    gevent workers and werkzeug's threads have no fixed number of requests at once). At most ``HELD_MAX`` (10) are kept
    and the rest go back to the pool after their use, so every read gets one in turn. Kept without that bound, the
    first 20 were put back on the process's stack, not in the pool, and the other 10 waited on the pool until its
    timeout (a 503 each)."""
    import threading

    import storage.db as dbmod

    db = Database(pg_url)
    db.reader.pool._timeout = 3.0
    start = threading.Barrier(30)
    got: list[object] = []

    def read() -> None:
        start.wait()
        try:
            with db.held_read() as conn:
                time.sleep(0.05)
                got.append(conn.exec_driver_sql("SELECT 1").scalar())
        except Exception as exc:  # noqa: BLE001 - what the assert shows
            got.append(exc)

    threads = [threading.Thread(target=read) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert got == [1] * 30
    assert len(db._held_all) == dbmod.HELD_MAX == 10 and db.reader.pool.checkedout() == 10
    db.dispose()
    assert db.reader.pool.checkedout() == 0
