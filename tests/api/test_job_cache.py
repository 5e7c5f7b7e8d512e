"""storage/job_cache.py: the fast path's GET of one job serves the rows it read until the job's change notice (PostgreSQL).

"Another process" is a plain psycopg connection of the test's own, outside
SQLAlchemy (so nothing of this process sees the write but the database's
notice), as a worker's or another API process's write is.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import update

from storage import job_cache, notices
from storage.db import Database
from storage.job_cache import JOB_CHANGES, JobRowsCache
from storage.models import Artifact, Job, utcnow
from tests.api.conftest import MINIMAL, RecordingDispatcher, make_app
from tests.api.test_fastpath import _key
from tests.conftest import _truncate


LISTENER = "quantfarm listens for job changes"  # the listening connection's application_name


def _until(check, seconds: float = 5.0) -> float:
    """Seconds until ``check()`` is true (fails after ``seconds``)."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < seconds
        time.sleep(0.02)
    return time.monotonic() - began


def _plain(url: str) -> psycopg.Connection:
    return psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)


@pytest.fixture
def reads(monkeypatch):
    """The job ids read from the database by the GET of one job (storage.job_reads.job_rows_by_id)."""
    from storage import job_reads

    read: list[str] = []
    real = job_reads.job_rows_by_id

    def spy(conn, job_id, **kw):
        read.append(job_id)
        return real(conn, job_id, **kw)

    monkeypatch.setattr(job_reads, "job_rows_by_id", spy)
    return read


@pytest.fixture
def farm(pg_url, store, tmp_path, monkeypatch):
    """An app with auth on (teams t1 and t2, a member key each, and an admin), a job of t1, rows kept an hour."""
    monkeypatch.setattr(job_cache, "MAX_AGE", 3600.0)  # only a notice or this process's write forgets them here
    db = Database(pg_url)
    _truncate(db)
    app = make_app(db, store, RecordingDispatcher(), tmp_path, auth="on")
    client = app.test_client()
    (_, member), (_, other), (_, admin) = _key(db, "t1", "member"), _key(db, "t2", "member"), _key(db, "t3", "admin")
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=member).get_json()["id"]
    for who in (member, other, admin):
        client.get("/v1/jobs", headers=who)  # a key's first use: Flask reads it and records its use
    yield {"db": db, "client": client, "member": member, "other": other, "admin": admin, "job": job_id, "url": pg_url}
    db.dispose()


def _get(farm, who="member", job_id=None):
    resp = farm["client"].get(f"/v1/jobs/{job_id or farm['job']}", headers=farm[who])
    return resp.status_code, resp.get_json()


def _replace_id(obj, old: str, new: str):
    """``obj`` (a JSON value) with the string ``old`` replaced by ``new`` wherever it appears."""
    if isinstance(obj, dict):
        return {k: _replace_id(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_id(v, old, new) for v in obj]
    return obj.replace(old, new) if isinstance(obj, str) else obj


def _layers(farm) -> int | None:
    """The job's layers done, as its GET shows them (None before any progress)."""
    return (_get(farm)[1]["progress"] or {}).get("layers_done")


def _kept(farm, reads) -> dict:
    """GET the job until the listener is up and its rows are kept; return the view."""
    _get(farm)  # the first lookup starts the listener
    _until(lambda: farm["db"].job_rows.live)
    _get(farm)  # read, and kept
    reads.clear()
    code, view = _get(farm)
    assert code == 200 and reads == []
    return view


def test_a_polled_job_is_read_once_until_another_process_changes_it(farm, reads):
    before = _kept(farm, reads)
    for _ in range(5):
        assert _get(farm) == (200, before)
    assert reads == []  # five GETs, no database read
    with _plain(farm["url"]) as conn:
        conn.execute("UPDATE jobs SET layers_done = 3, layers_total = 7 WHERE id = %s", (farm["job"],))
    took = _until(lambda: _layers(farm) == 3, 2.0)  # the notice, not the hour's age
    assert took < 2.0 and reads  # read again after the notice
    reads.clear()
    code, after = _get(farm)
    assert code == 200 and after["progress"]["layers_done"] == 3 and reads == []  # and kept again
    assert {k: v for k, v in after.items() if k not in ("progress", "eta_seconds")} == \
        {k: v for k, v in before.items() if k not in ("progress", "eta_seconds")}


def test_an_artifact_stored_by_another_process_is_seen_at_its_notice(farm, reads):
    assert _kept(farm, reads)["artifacts"] == []
    with _plain(farm["url"]) as conn:
        conn.execute("INSERT INTO artifacts (id, job_id, kind, format, location, sha256, file_count, size_bytes, files, "
                     "created_at) VALUES ('art_x', %s, 'model', 'gptq', 'x', %s, 1, 7, '[]', now())", (farm["job"], "ab" * 32))
    _until(lambda: [a["id"] for a in _get(farm)[1]["artifacts"]] == ["art_x"], 2.0)
    with _plain(farm["url"]) as conn:
        conn.execute("DELETE FROM artifacts WHERE id = 'art_x'")
    _until(lambda: _get(farm)[1]["artifacts"] == [], 2.0)


def test_a_change_through_this_process_is_read_at_once(farm, reads, monkeypatch):
    """No notice is heard here (the listener's forgetting is switched off): the write itself forgets the kept rows
    before it returns, an ORM flush and a Core statement alike."""
    _kept(farm, reads)
    monkeypatch.setattr(JobRowsCache, "forget", lambda self, job_id: None)
    db = farm["db"]
    with db.session() as s:
        s.execute(update(Job).where(Job.id == farm["job"]).values(layers_done=2, layers_total=9))
    assert _layers(farm) == 2
    with db.session() as s:
        s.add(Artifact(id="art_y", job_id=farm["job"], kind="model", format="gptq", location="x", sha256="ab" * 32,
                       file_count=1, size_bytes=7, files=[], created_at=utcnow()))
    assert [a["id"] for a in _get(farm)[1]["artifacts"]] == ["art_y"]
    other_db = Database(farm["url"])  # another engine of this process: the same
    try:
        with other_db.session() as s:
            s.execute(update(Job).where(Job.id == farm["job"]).values(layers_done=4))
        assert _layers(farm) == 4
    finally:
        other_db.dispose()


def test_another_teams_kept_job_is_not_found(farm, reads):
    view = _kept(farm, reads)
    code, body = _get(farm, "other")
    unknown = f"job_{'0' * 26}"
    code_unknown, body_unknown = _get(farm, "other", unknown)
    assert (code, code_unknown) == (404, 404)
    assert body == _replace_id(body_unknown, unknown, farm["job"])  # the answer for a job that does not exist
    assert _get(farm, "admin") == (200, view)  # an admin reads every team's jobs, kept or not
    assert _get(farm, "member") == (200, view)


def test_nothing_is_kept_while_nobody_listens_and_all_is_forgotten_when_it_listens_again(farm, reads, monkeypatch):
    """The listening backend is killed (as a database restart does) and cannot listen again until the test lets it:
    a change made meanwhile (its notice lost) is read at once, every GET reads, and nothing read before is served
    after."""
    _kept(farm, reads)
    gate = threading.Event()
    real = notices.listening_connection

    def held(db, channel, what):
        gate.wait(10)
        return real(db, channel, what)

    monkeypatch.setattr(notices, "listening_connection", held)
    with _plain(farm["url"]) as conn:
        [(killed,)] = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND application_name = %s", (LISTENER,)).fetchall()
        assert killed == 1
        _until(lambda: not farm["db"].job_rows.live)
        conn.execute("UPDATE jobs SET layers_done = 5, layers_total = 7 WHERE id = %s", (farm["job"],))
    reads.clear()
    assert [_layers(farm) for _ in range(3)] == [5, 5, 5]
    assert reads == [farm["job"]] * 3  # nothing kept meanwhile
    gate.set()
    _until(lambda: farm["db"].job_rows.live)
    assert _layers(farm) == 5


def test_rows_older_than_max_age_are_read_again(farm, reads, monkeypatch):
    _kept(farm, reads)
    monkeypatch.setattr(job_cache, "MAX_AGE", 0.0)
    time.sleep(0.01)
    _get(farm)
    _get(farm)
    assert reads == [farm["job"], farm["job"]]


def test_the_listener_stops_when_unused_and_at_dispose(farm, reads, monkeypatch):
    def listening() -> int:
        with _plain(farm["url"]) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name = %s", (LISTENER,)).fetchone()[0]

    cache = farm["db"].job_rows
    _kept(farm, reads)
    assert listening() == 1
    monkeypatch.setattr(job_cache, "IDLE_STOP", 0.3)
    _until(lambda: not cache.live and cache._thread is None)
    _until(lambda: listening() == 0)
    _kept(farm, reads)  # the next lookup starts it again
    assert listening() == 1
    monkeypatch.setattr(job_cache, "IDLE_STOP", 3600.0)
    farm["db"].dispose()
    assert not cache.live and cache._thread is None
    _until(lambda: listening() == 0)
    _get(farm)  # a disposed database's cache keeps nothing and starts nothing
    assert not cache.live and cache._thread is None


def test_a_read_that_overlaps_a_change_keeps_nothing():
    """Rows read before a change whose notice came during the read are not kept (they may be the old ones)."""
    cache = JobRowsCache(db=None)
    cache._live = True  # as if listening (no thread here)
    cache._thread = threading.current_thread()
    rows = (("job_a", "team_1"),)
    token = cache.token()
    cache.forget("job_other")  # any notice during the read
    cache.put("job_a", rows, token)
    assert cache.get("job_a", None) is None
    cache.put("job_a", rows, cache.token())
    assert cache.get("job_a", None) is rows and cache.get("job_a", "team_1") is rows
    assert cache.get("job_a", "team_2") is None  # another team's caller: read, as before
    cache.forget_all()
    assert cache.get("job_a", None) is None
    cache._live = False
    assert cache.token() is None


def test_each_change_notifies_the_jobs_id_at_its_commit(farm):
    """The triggers of migration 0008: a job's UPDATE and DELETE, an artifact's INSERT, UPDATE and DELETE, each
    notify the job's id when their transaction commits; a rolled-back change notifies nothing; a TRUNCATE, '*'."""
    job = farm["job"]
    with _plain(farm["url"]) as listener, _plain(farm["url"]) as writer:
        listener.execute(f"LISTEN {JOB_CHANGES}")

        def heard() -> list[str]:
            return [n.payload for n in listener.notifies(timeout=0.5)]

        writer.execute("UPDATE jobs SET layers_done = 1 WHERE id = %s", (job,))
        assert heard() == [job]
        with writer.transaction():
            writer.execute("UPDATE jobs SET layers_done = 2 WHERE id = %s", (job,))
            writer.execute("UPDATE jobs SET layers_done = 3 WHERE id = %s", (job,))
            assert [n.payload for n in listener.notifies(timeout=0.3)] == []  # not before the commit
        assert heard() == [job]  # one notice for the transaction
        with pytest.raises(RuntimeError):
            with writer.transaction():
                writer.execute("UPDATE jobs SET layers_done = 4 WHERE id = %s", (job,))
                raise RuntimeError("rolled back")
        assert heard() == []
        writer.execute("INSERT INTO artifacts (id, job_id, kind, format, location, sha256, file_count, size_bytes, files, "
                       "created_at) VALUES ('art_z', %s, 'model', 'gptq', 'x', %s, 1, 7, '[]', now())", (job, "ab" * 32))
        assert heard() == [job]
        writer.execute("UPDATE artifacts SET size_bytes = 8 WHERE id = 'art_z'")
        assert heard() == [job]
        writer.execute("DELETE FROM artifacts WHERE id = 'art_z'")
        assert heard() == [job]
        writer.execute("UPDATE job_events SET message = message WHERE job_id = %s", (job,))  # not the job's view
        assert heard() == []
        writer.execute("TRUNCATE artifacts")
        assert heard() == ["*"]
        writer.execute("DELETE FROM job_events WHERE job_id = %s", (job,))
        writer.execute("DELETE FROM jobs WHERE id = %s", (job,))
        assert heard() == [job]


def test_the_kept_rows_are_bounded_by_their_text(monkeypatch):
    """A spec can be a megabyte: the rows kept hold at most MAX_CHARS of text (emptied when a job's would pass it)."""
    monkeypatch.setattr(job_cache, "MAX_CHARS", 100)
    cache = JobRowsCache(db=None)
    cache._live = True
    cache._thread = threading.current_thread()

    def rows(job_id: str) -> tuple:
        return ((job_id, "team_1", "x" * 34),)  # 40 characters of text

    for job_id in ("job_a", "job_b"):
        cache.put(job_id, rows(job_id), cache.token())
    assert cache.get("job_a", None) is not None and cache.get("job_b", None) is not None
    cache.put("job_c", rows("job_c"), cache.token())  # 120 > 100: the others go
    assert [cache.get(j, None) is not None for j in ("job_a", "job_b", "job_c")] == [False, False, True]
    cache.forget("job_c")
    cache.put("job_a", rows("job_a"), cache.token())
    cache.put("job_b", rows("job_b"), cache.token())  # 80: forgetting job_c gave its text back
    assert [cache.get(j, None) is not None for j in ("job_a", "job_b")] == [True, True]
    cache.put("job_a", rows("job_a"), cache.token())  # kept again: counted once
    assert cache.get("job_b", None) is not None


@pytest.fixture
def page_reads(monkeypatch):
    """The job ids whose rows a page read from the database (storage.job_reads.job_rows_by_ids), a list per read."""
    from storage import job_reads

    read: list[list[str]] = []
    real = job_reads.job_rows_by_ids

    def spy(conn, ids, **kw):
        read.append(list(ids))
        return real(conn, ids, **kw)

    monkeypatch.setattr(job_reads, "job_rows_by_ids", spy)
    return read


def _page(farm, query: str = "", who: str = "member") -> dict:
    resp = farm["client"].get(f"/v1/jobs{query}", headers=farm[who])
    assert resp.status_code == 200
    return resp.get_json()


def test_a_page_reads_the_rows_of_only_the_jobs_not_kept(farm, reads, page_reads):
    """The database chooses the page's jobs every time; the rows of jobs kept are not read again, and a job changed
    by another process is read again after its notice (alone)."""
    client, member = farm["client"], farm["member"]
    more = [client.post("/v1/jobs", json=MINIMAL, headers=member).get_json()["id"] for _ in range(3)]
    newest = [*more[::-1], farm["job"]]
    _kept(farm, reads)  # the listener is up; the first job's rows are kept
    page_reads.clear()
    first = _page(farm)
    assert [j["id"] for j in first["items"]] == newest and page_reads == [more[::-1]]
    assert _page(farm) == first and page_reads == [more[::-1]]  # every job kept: no rows read
    with _plain(farm["url"]) as conn:
        conn.execute("UPDATE jobs SET layers_done = 1, layers_total = 2 WHERE id = %s", (more[1],))
    _until(lambda: (_page(farm)["items"][1]["progress"] or {}).get("layers_done") == 1, 2.0)
    assert page_reads[-1] == [more[1]]
    page_reads.clear()
    client.post("/v1/jobs", json=MINIMAL, headers=member)  # a new job: chosen by the database at once
    page = _page(farm, "?limit=2")
    assert [j["id"] for j in page["items"]][1:] == [more[2]] and page["next_cursor"] == more[2]
    assert len(page_reads) == 1 and len(page_reads[0]) == 1  # the new job's rows only
    assert _page(farm, "?limit=2", "other") == {"items": [], "next_cursor": None}  # another team's jobs, kept or not


def test_a_page_by_status_never_shows_a_kept_row_of_another_status(farm, reads, page_reads, monkeypatch):
    """Even with no notice heard (switched off here), a page chosen by status shows each job's rows only when they
    show that status: a kept row that does not is read again."""
    _kept(farm, reads)
    _page(farm)
    monkeypatch.setattr(JobRowsCache, "forget", lambda self, job_id: None)
    with _plain(farm["url"]) as conn:
        conn.execute("UPDATE jobs SET status = 'running', started_at = now() WHERE id = %s", (farm["job"],))
    page_reads.clear()
    (item,) = _page(farm, "?status=running")["items"]
    assert (item["id"], item["status"]) == (farm["job"], "running") and page_reads == [[farm["job"]]]
    assert _page(farm, "?status=queued")["items"] == []


def test_a_read_between_a_commits_event_and_the_commit_is_not_served_after_it(farm, reads, monkeypatch):
    """SQLAlchemy's ``commit`` event comes before the driver's commit: a GET of another thread just then reads the
    rows as they were, and keeps them. The session's ``after_commit`` forgets them again, so the writer's next GET
    reads its change (no notice heard here: the listener's forgetting is switched off)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    _kept(farm, reads)
    monkeypatch.setattr(JobRowsCache, "forget", lambda self, job_id: None)
    seen: list[int | None] = []

    def read_meanwhile(conn):
        if not seen:
            seen.append(_layers(farm))  # another connection: the row as committed so far

    event.listen(Engine, "commit", read_meanwhile)
    try:
        with farm["db"].session() as s:
            s.execute(update(Job).where(Job.id == farm["job"]).values(layers_done=6, layers_total=9))
    finally:
        event.remove(Engine, "commit", read_meanwhile)
    assert seen == [None]  # read before the commit: no progress yet
    assert _layers(farm) == 6


def test_a_database_without_the_triggers_keeps_nothing(farm, reads, monkeypatch, caplog):
    """Code newer than the schema (a rolling upgrade before migration 0008): no notice would come, so nothing is kept
    and every GET reads; once the triggers exist, rows are kept."""
    import logging

    monkeypatch.setattr(job_cache, "NO_TRIGGERS_SECONDS", 0.1)
    caplog.set_level(logging.WARNING, logger="storage.job_cache")
    with _plain(farm["url"]) as conn:
        conn.execute("ALTER TRIGGER jobs_changed ON jobs RENAME TO jobs_changed_off")
        try:
            _get(farm)  # the listener is up (the fixture's pages started it): it looks for the triggers as it listens
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND application_name = %s", (LISTENER,))
            _until(lambda: "migration 0008 has not run" in caplog.text)
            reads.clear()
            for _ in range(3):
                _get(farm)
                time.sleep(0.05)
            assert reads == [farm["job"]] * 3 and not farm["db"].job_rows.live
        finally:
            conn.execute("ALTER TRIGGER jobs_changed_off ON jobs RENAME TO jobs_changed")
    _until(lambda: farm["db"].job_rows.live)


def test_a_forked_child_keeps_nothing_of_its_parents(farm, reads):
    """A child forked while its parent listens has neither the parent's listener nor its rows."""
    import os

    _kept(farm, reads)
    cache = farm["db"].job_rows
    pid = os.fork()
    if pid == 0:  # the child: no pytest here, only an exit code
        ok = not cache.live and cache._thread is None and cache._rows == {} and cache.token() is None
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.live and _get(farm)[0] == 200


def test_a_job_that_leaves_a_pages_status_between_its_two_statements_is_left_out(farm, reads, monkeypatch):
    """The page's jobs are chosen by one statement and the rows not kept read by a second: a job that changed status
    in between is not shown in a page of the status it left."""
    from storage import job_reads

    _kept(farm, reads)
    new = farm["client"].post("/v1/jobs", json=MINIMAL, headers=farm["member"]).get_json()["id"]
    real = job_reads.page_heads

    def then_started(conn, **kw):
        heads = real(conn, **kw)
        with _plain(farm["url"]) as other:
            other.execute("UPDATE jobs SET status = 'running' WHERE id = %s", (new,))
        return heads

    monkeypatch.setattr(job_reads, "page_heads", then_started)
    page = _page(farm, "?status=queued")
    assert [j["id"] for j in page["items"]] == [farm["job"]] and all(j["status"] == "queued" for j in page["items"])
