"""api/submits.py and storage.jobs.insert_jobs: the submits that arrive together stored by one statement (PostgreSQL)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import func, select, text, update

from api import auth
from api.job_service import Checked
from quantfarm.spec import parse_spec, public_spec
from storage import jobs as job_store
from storage.db import Database
from storage.models import Job, JobEvent, Team, TeamQueued
from storage.teams import Role
from tests.api.conftest import MINIMAL, RecordingDispatcher, make_app
from tests.api.test_fastpath import _key
from tests.conftest import test_keyring


@pytest.fixture
def pg(pg_url):
    from tests.conftest import _truncate

    db = Database(pg_url, keyring=test_keyring())
    _truncate(db)
    yield db
    db.dispose()


def _team(db, name: str, max_queued: int | None = None) -> str:
    from storage import teams as team_store

    with db.session() as s:
        team = team_store.create_team(s, name)
        team.max_queued = max_queued
        return team.id


def _queued(db, team_id: str) -> tuple[int, int]:
    """(the team's queued jobs as counted, its queued rows)."""
    with db.read() as s:
        counted = s.scalar(select(func.coalesce(func.sum(TeamQueued.queued), 0)).where(TeamQueued.team_id == team_id))
        real = s.scalar(select(func.count()).select_from(Job).where(Job.team_id == team_id, Job.status == "queued"))
    return counted, real


def _fields(team_id: str) -> dict:
    """A job's fields for insert_job (a spec whose text json.dumps escapes)."""
    return {"method": "rtn", "model_ref": "local:/m", "spec": {"model": {"source": "local", "path": "/m"}, "method": "rtn",
                                                                "labels": {"équipe": "nlp ☃ \U0001f600", "q": "a\"b\\c"}},
            "secrets": {"model.token": "hf_secret"}, "priority": 3, "team_id": team_id, "created_by": "key_x",
            "memory_estimate": 2**40}


def _values(team_id: str) -> dict:
    """A new job's row (insert_jobs's)."""
    return job_store.new_job_values(**_fields(team_id))


def _held_insert(monkeypatch, batches, waiting: int):
    """Hold the first statement until ``waiting`` submits queue behind it; return the sizes of the batches run."""
    real, sizes, go = job_store.insert_jobs, [], threading.Event()

    def held(db, rows):
        sizes.append(len(rows))
        if len(sizes) == 1:
            go.wait(20)
        return real(db, rows)

    def release_when_queued():
        deadline = time.monotonic() + 20
        while len(batches._waiting) < waiting and time.monotonic() < deadline:
            time.sleep(0.005)
        go.set()

    monkeypatch.setattr(job_store, "insert_jobs", held)
    threading.Thread(target=release_when_queued, daemon=True).start()
    return sizes


def test_a_batch_stores_each_team_up_to_its_limit_counting_its_own_earlier_jobs(pg):
    """One statement, several jobs of two teams: a team's jobs are stored in their order while the team (its queued
    jobs, then the batch's own before each) is under its limit; the rest of it stores nothing, not even an event."""
    a, b = _team(pg, "a", max_queued=3), _team(pg, "b")
    job_store.insert_job(pg, **_fields(a))  # one queued job of a's already
    rows = [_values(a), _values(b), _values(a), _values(a), _values(b), _values(b)]
    dialect = pg.reader.dialect
    stored = job_store.insert_jobs(pg, [job_store.batch_row(dialect, v, 2) for v in rows])
    # a: 1 queued + 2 of the batch = its own limit (3); b: the farm's limit (2), so its third is refused.
    assert stored == {rows[0]["id"], rows[1]["id"], rows[2]["id"], rows[4]["id"]}
    assert _queued(pg, a) == (3, 3) and _queued(pg, b) == (2, 2)
    with pg.read() as s:
        events = s.scalars(select(JobEvent.job_id)).all()
        jobs = s.scalars(select(Job.id)).all()
    assert len(jobs) == 5 and sorted(events) == sorted(jobs) and stored <= set(jobs)  # one event a job, no more
    # A batch of one (insert_job's quota) at the limit stores nothing; a batch entirely over it stores nothing either.
    assert job_store.insert_job(pg, **_fields(a), quota=100) is None
    assert job_store.insert_jobs(pg, [job_store.batch_row(dialect, _values(b), 2) for _ in range(3)]) == set()
    assert _queued(pg, a) == (3, 3) and _queued(pg, b) == (2, 2)


def test_a_batch_stores_the_rows_a_single_insert_stores(pg):
    """Every column of the job and of its event, as insert_job's two INSERTs write them (but the id and the times)."""
    from sqlalchemy import inspect

    team = _team(pg, "t")
    one = job_store.insert_job(pg, **_fields(team))
    other = _values(team)
    assert job_store.insert_jobs(pg, [job_store.batch_row(pg.reader.dialect, other, 10)]) == {other["id"]}
    skip = {"id", "created_at", "updated_at", "enqueued_at", "job_id", "at"}
    with pg.session() as s:
        rows = []
        for job_id in (one["id"], other["id"]):
            job = s.get(Job, job_id)
            [event] = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
            rows.append(({c.key: getattr(job, c.key) for c in inspect(Job).columns if c.key not in skip},
                         {c.key: getattr(event, c.key) for c in inspect(JobEvent).columns if c.key not in skip | {"id"}}))
            assert job.created_at == job.updated_at == job.enqueued_at == event.at
        assert rows[0] == rows[1] and rows[0][0]["secrets"] == {"model.token": "hf_secret"}
        assert s.get(Job, other["id"]).created_at == other["created_at"]
    # The json columns' stored text too, byte for byte (the spec's escapes and spacing as json.dumps writes them).
    with pg.read() as s:
        texts = [s.execute(text("SELECT spec::text, metrics::text, secrets::text FROM jobs WHERE id = :id"), {"id": j}).one()
                 for j in (one["id"], other["id"])]
    assert texts[0][:2] == texts[1][:2] and texts[0][0] == json.dumps(_fields(team)["spec"])
    assert texts[0][2] != texts[1][2]  # each sealed on its own (a fresh nonce), neither the secret in clear
    assert "hf_secret" not in texts[0][2] + texts[1][2]


def test_concurrent_fast_submits_of_one_team_store_exactly_its_limit(pg, store, tmp_path, monkeypatch):
    """Twelve submits of one team at once through the fast path, its limit 5 with one job queued: one statement, then
    one batch of the other eleven; exactly four stored (201), eight answered 429 by Flask; no broker message (the
    database announces the jobs: test_a_batchs_jobs_are_announced_by_the_database_at_its_commit)."""
    broker = RecordingDispatcher()
    app = make_app(pg, store, broker, tmp_path, auth="on")
    batches = app.wsgi_app.submits
    team, member = _key(pg, "t1", "member")
    with pg.session() as s:
        s.execute(update(Team).where(Team.id == team).values(max_queued=5))
    client = app.test_client()
    assert client.post("/v1/jobs", json=MINIMAL, headers=member).status_code == 201  # the key's first use: Flask's
    assert client.get("/v1/jobs", headers=member).status_code == 200
    sizes = _held_insert(monkeypatch, batches, 11)
    answers: list = []

    def post():
        r = app.test_client().post("/v1/jobs", json=MINIMAL, headers=member)
        answers.append((r.status_code, r.get_json()))

    threads = [threading.Thread(target=post) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sizes == [1, 11]
    created = [body["id"] for code, body in answers if code == 201]
    assert sorted(code for code, _ in answers) == [201] * 4 + [429] * 8
    assert all(body["error"] == "quota_exceeded" for code, body in answers if code == 429)
    assert _queued(pg, team) == (5, 5)
    assert broker.jobs == []
    assert {client.get(f"/v1/jobs/{j}", headers=member).get_json()["status"] for j in created} == {"queued"}


def _checked(team_id: str) -> Checked:
    spec = parse_spec(MINIMAL)
    return Checked(spec, public_spec(spec), auth.Principal("key_1", team_id, Role.MEMBER), None)


def _submit_together(app, batches, checked: list[Checked]):
    """``batches.create`` of each at once (the first statement held until the rest queue); (view or error) each."""
    out: list = [None] * len(checked)

    def one(i):
        with app.app_context():
            try:
                out[i] = batches.create(checked[i], 100)
            except Exception as exc:  # noqa: BLE001 - what the test looks at
                out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(checked))]
    threads[0].start()
    while not batches._leading:
        time.sleep(0.001)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    return out


def test_one_bad_job_in_a_batch_fails_alone(pg, store, tmp_path, monkeypatch):
    """The database refuses the batch's statement (a job of a team that does not exist): nothing was stored, so each
    job is stored again on its own: the others are stored, the bad one's submit raises its error."""
    from sqlalchemy.exc import IntegrityError

    broker = RecordingDispatcher()
    app = make_app(pg, store, broker, tmp_path)
    batches = app.wsgi_app.submits
    team = _team(pg, "good")
    sizes = _held_insert(monkeypatch, batches, 3)
    out = _submit_together(app, batches, [_checked(team), _checked(team), _checked("team_gone"), _checked(team)])
    assert sizes == [1, 3, 1, 1, 1]  # the first alone, then the batch of three, then each of them again
    assert isinstance(out[2], IntegrityError)
    views = [out[0], out[1], out[3]]
    assert all(isinstance(v, dict) and v["status"] == "queued" for v in views)
    assert _queued(pg, team) == (3, 3) and broker.jobs == []


def test_a_batchs_jobs_are_announced_by_the_database_at_its_commit(pg, store, tmp_path, monkeypatch):
    """No broker message on PostgreSQL: each committed statement that stores jobs notifies the new-jobs channel once
    (an idle worker's poller listens: storage/notices.py), delivered only at its commit; a statement the database
    refused (rolled back) announces nothing."""
    from sqlalchemy.exc import IntegrityError

    from storage.notices import NewJobNotices

    broker = RecordingDispatcher(db=pg)
    app = make_app(pg, store, broker, tmp_path)
    batches = app.wsgi_app.submits
    team = _team(pg, "t")
    notices = NewJobNotices(pg)
    try:
        assert notices.wait(5)  # listening now (a new connection counts as a notice: what came before is lost)
        assert not notices.wait(0.3)
        committed, go = threading.Event(), threading.Event()
        real = job_store.insert_jobs

        def held(db, rows):  # the statement done, its commit delayed: a notice must wait for the commit
            with db.held_read() as conn:
                cur = conn.connection.dbapi_connection.cursor()
                cur.execute("BEGIN")
                try:
                    cur.execute(job_store._BATCH_SQL, (f"[{','.join(rows)}]",))
                    ids = {row[0] for row in cur.fetchall()}
                    assert go.wait(20)
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
            committed.set()
            return ids

        monkeypatch.setattr(job_store, "insert_jobs", held)
        out: list = []

        def one():
            with app.app_context():
                out.append(batches.create(_checked(team), 100))

        t = threading.Thread(target=one)
        t.start()
        assert not notices.wait(0.5) and not committed.is_set()  # inserted, not committed: nobody told yet
        go.set()
        assert notices.wait(5) and committed.wait(5)
        t.join(20)
        assert [v["status"] for v in out] == ["queued"]
        assert not notices.wait(0.3)  # one notice a statement
        views = _submit_together(app, batches, [_checked(team), _checked(team), _checked(team)])
        assert [v["status"] for v in views] == ["queued"] * 3
        assert notices.wait(5)  # two statements (the first alone, then the other two): their notices, one wake-up
        monkeypatch.setattr(job_store, "insert_jobs", real)
        with app.app_context(), pytest.raises(IntegrityError):
            batches.create(_checked("team_gone"), 100)  # refused: rolled back
        assert not notices.wait(0.5)
        assert broker.jobs == [] and _queued(pg, team) == (4, 4)
    finally:
        notices.close()


def test_on_sqlite_submits_are_not_batched(lite):
    """The embedded farm's one writer: the fast path's submit stores each job as before (job_service.create)."""
    assert lite.wsgi_app.submits is None
    assert lite.test_client().post("/v1/jobs", json=MINIMAL).status_code == 201


def test_a_batch_whose_outcome_is_in_doubt_is_never_stored_again(pg, store, tmp_path, monkeypatch):
    """A broken connection (no answer from the database: perhaps committed): every submit of the batch raises the
    error, none is stored again; the next submit stores as usual."""
    import sqlalchemy as sa

    app = make_app(pg, store, RecordingDispatcher(), tmp_path)
    batches = app.wsgi_app.submits
    team = _team(pg, "t")
    real, calls, go = job_store.insert_jobs, [], threading.Event()

    def broken(db, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            go.wait(20)
            return real(db, rows)
        raise sa.exc.OperationalError("WITH ...", {}, ConnectionResetError("server closed the connection"))

    monkeypatch.setattr(job_store, "insert_jobs", broken)

    def release():
        while len(batches._waiting) < 3:
            time.sleep(0.005)
        go.set()

    threading.Thread(target=release, daemon=True).start()
    out = _submit_together(app, batches, [_checked(team) for _ in range(4)])
    assert calls == [1, 3] and isinstance(out[0], dict)
    assert all(isinstance(e, sa.exc.OperationalError) for e in out[1:])
    monkeypatch.setattr(job_store, "insert_jobs", real)
    with app.app_context():
        assert batches.create(_checked(team), 100)["status"] == "queued"
    assert _queued(pg, team) == (2, 2)


@pytest.mark.parametrize("leaders", [1, 2])
def test_many_threads_submitting_at_once_each_get_their_own_answer(pg, store, tmp_path, leaders):
    """16 threads, 6 submits each, through one process's batches (one or two statements at a time): every job stored
    once, answered to its own thread; the team's count equals its rows; fewer statements than jobs."""
    from api.submits import SubmitBatches

    broker = RecordingDispatcher()
    app = make_app(pg, store, broker, tmp_path)
    batches = SubmitBatches(pg, leaders=leaders)
    team = _team(pg, "t")
    answers: dict[int, list] = {}

    def worker(i):
        with app.app_context():
            answers[i] = [batches.create(_checked(team), 10**6)["id"] for _ in range(6)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [j for got in answers.values() for j in got]
    assert len(answers) == 16 and len(set(ids)) == 96 == batches.jobs
    assert broker.jobs == [] and _queued(pg, team) == (96, 96)
    assert batches.batches < 96 and batches._leading == 0 and batches._waiting == []
