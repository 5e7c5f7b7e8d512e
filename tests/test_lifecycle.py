"""The job state machine: the allowed-moves table, compare-and-set claims, events."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from quantfarm.errors import InvalidState, LeaseLost, NotFound
from storage import jobs
from storage.job_reads import job_views_page
from storage.jobs import ALLOWED, JobStatus
from storage.models import Job, JobEvent


def new_job(db) -> str:
    with db.session() as s:
        return jobs.create_job(s, method="rtn", model_ref="m", spec={"labels": {}}, secrets={}).id


def status(db, job_id) -> str:
    with db.session() as s:
        return jobs.get_job(s, job_id).status


def test_every_move_outside_the_table_is_refused(db):
    for frm in JobStatus:
        for to in JobStatus:
            job_id = new_job(db)
            with db.session() as s:
                s.get(Job, job_id).status = frm.value
            with db.session() as s:
                job = jobs.get_job(s, job_id)
                take = ("w1", 60) if to == JobStatus.RUNNING else None  # running only by a claim
                if to in ALLOWED[frm]:
                    jobs.transition(s, job, to, take=take)
                    assert job.status == to.value
                else:
                    with pytest.raises(InvalidState):
                        jobs.transition(s, job, to, take=take)
            assert status(db, job_id) == (to.value if to in ALLOWED[frm] else frm.value)


def test_transition_appends_an_event_and_sets_finished_at(db):
    job_id = new_job(db)
    with db.session() as s:
        job = jobs.claim(s, job_id, "w1", 60)
        jobs.transition(s, job, JobStatus.FAILED, owner="w1", error_code="x", error_message="boom")
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        evs = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    assert [(e.from_status, e.to_status) for e in evs] == [(None, "queued"), ("queued", "running"), ("running", "failed")]
    assert job.finished_at is not None and job.lease_owner is None and job.error_code == "x"


def test_only_one_of_many_concurrent_claims_wins(db):
    job_id = new_job(db)
    winners = []
    barrier = threading.Barrier(6)

    def claim(i):
        barrier.wait()
        with db.session() as s:
            if jobs.claim(s, job_id, f"w{i}", 60) is not None:
                winners.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with db.session() as s:
        assert jobs.get_job(s, job_id).lease_owner == f"w{winners[0]}"


def test_heartbeat_by_a_stranger_raises_lease_lost(db):
    job_id = new_job(db)
    with db.session() as s:
        jobs.claim(s, job_id, "w1", 60)
    with db.session() as s:
        assert jobs.heartbeat(s, job_id, "w1", 60) is False
    with pytest.raises(LeaseLost):
        with db.session() as s:
            jobs.heartbeat(s, job_id, "w2", 60)
    with db.session() as s:
        jobs.request_cancel(s, job_id)
    with db.session() as s:
        assert jobs.heartbeat(s, job_id, "w1", 60) is True  # the worker learns of the cancel


def test_cancel_and_retry_rules(db):
    queued = new_job(db)
    with db.session() as s:
        assert jobs.request_cancel(s, queued).status == "cancelled"
    with pytest.raises(InvalidState):
        with db.session() as s:
            jobs.request_cancel(s, queued)
    with db.session() as s:
        job = jobs.retry(s, queued)
        assert (job.status, job.attempt) == ("queued", 2)
    with pytest.raises(InvalidState):
        with db.session() as s:
            jobs.retry(s, queued)
    with pytest.raises(NotFound):
        with db.session() as s:
            jobs.get_job(s, "job_missing")


def test_list_pages_newest_first(db):
    ids = [new_job(db) for _ in range(5)]
    seen, cursor = [], None
    while True:
        with db.connect_read() as conn:
            page, cursor = job_views_page(conn, limit=2, cursor=cursor)
        seen += [j["id"] for j in page]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    with db.connect_read() as conn:  # the pages' variant: no artifacts joined
        bare, _ = job_views_page(conn, limit=10, with_artifacts=False)
    assert [(j["id"], j["artifacts"]) for j in bare] == [(i, []) for i in seen]


def _queued(db) -> tuple[int, int]:
    """(the team's counted queued jobs, its queued rows in the jobs table), for the default team."""
    from sqlalchemy import func

    from storage.models import DEFAULT_TEAM_ID, TeamQueued

    with db.session() as s:
        counted = s.scalar(select(func.coalesce(func.sum(TeamQueued.queued), 0)).where(TeamQueued.team_id == DEFAULT_TEAM_ID))
        real = s.scalar(select(func.count()).select_from(Job).where(Job.team_id == DEFAULT_TEAM_ID, Job.status == "queued"))
    return counted, real


def test_the_teams_queued_count_follows_every_move_in_and_out_of_queued(db):
    """storage.models.TeamQueued: created (ORM and the API's two INSERTs), claimed, cancelled, retried, released,
    requeued after a lost lease, failed and succeeded: after each, the count equals the queued rows."""
    from datetime import timedelta

    from sqlalchemy import update

    from storage.models import DEFAULT_TEAM_ID, utcnow
    from storage.teams import ensure_default_team

    with db.session() as s:
        ensure_default_team(s)
    ids = [new_job(db) for _ in range(4)]
    ids.append(jobs.insert_job(db, method="rtn", model_ref="m", spec={}, secrets={}, priority=0, team_id=DEFAULT_TEAM_ID,
                               created_by=None, memory_estimate=None)["id"])
    assert _queued(db) == (5, 5)
    with db.session() as s:
        jobs.claim(s, ids[0], "w1", 60)
    with db.session() as s:
        jobs.claim(s, ids[1], "w1", 60)
    assert _queued(db) == (3, 3)
    with db.session() as s:
        jobs.request_cancel(s, ids[2])
    assert _queued(db) == (2, 2)
    with db.session() as s:
        jobs.retry(s, ids[2])
    assert _queued(db) == (3, 3)
    with db.session() as s:
        jobs.release(s, jobs.get_job(s, ids[0]), jobs.Lease("w1"), "handed on")
    assert _queued(db) == (4, 4)
    with db.session() as s:
        jobs.transition(s, jobs.get_job(s, ids[1]), JobStatus.FAILED, owner="w1", error_code="x", error_message="boom")
    assert _queued(db) == (4, 4)  # running -> failed: not a queued job before or after
    with db.session() as s:
        job = jobs.claim(s, ids[4], "w2", 60)
    with db.session() as s:
        s.execute(update(Job).where(Job.id == ids[4]).values(lease_expires_at=utcnow() - timedelta(seconds=5)))
    with db.session() as s:
        assert jobs.requeue_lost(s, jobs.get_job(s, ids[4]), max_attempts=3) == JobStatus.QUEUED
    assert _queued(db) == (4, 4)
    with db.session() as s:
        job = jobs.claim(s, ids[4], "w2", 60)
        jobs.transition(s, job, JobStatus.SUCCEEDED, owner="w2")
    assert _queued(db) == (3, 3)
    with db.session() as s, pytest.raises(InvalidState):  # a move the table refuses counts nothing
        jobs.transition(s, jobs.get_job(s, ids[4]), JobStatus.CANCELLED)
    assert _queued(db) == (3, 3)


def test_concurrent_submits_and_claims_keep_the_count_exact(pg_url):
    """Submits (the API's INSERTs) and claims from many threads at once: the count ends equal to the queued rows."""
    from storage.db import Database
    from storage.models import DEFAULT_TEAM_ID
    from storage.scheduler import claim_next
    from storage.teams import ensure_default_team
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    with db.session() as s:
        ensure_default_team(s)
    errors = []

    def submit():
        try:
            for _ in range(15):
                jobs.insert_job(db, method="rtn", model_ref="m", spec={}, secrets={}, priority=0, team_id=DEFAULT_TEAM_ID,
                                created_by=None, memory_estimate=None)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    def claim(owner):
        try:
            for _ in range(10):
                with db.session() as s:
                    claim_next(s, owner, 60)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(6)] + [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counted, real = _queued(db)
    assert counted == real and 60 <= real <= 90, (counted, real)
    db.dispose()


def test_a_submit_does_not_wait_for_another_backends_uncommitted_count(pg_url):
    """Each database backend counts in its own slot: a transaction holding its slot's row (until its commit) does not
    hold up another connection's submit of the same team (unless both backends' pids share a slot)."""
    from storage.db import Database
    from storage.models import DEFAULT_TEAM_ID
    from storage.teams import ensure_default_team
    from tests.conftest import _truncate

    def slot(conn):
        return conn.connection.dbapi_connection.info.backend_pid % jobs.QUEUED_SLOTS

    db = Database(pg_url)
    _truncate(db)
    with db.session() as s:
        ensure_default_team(s)
    with db.reader.connect() as conn:  # the reader pool's one connection, which the submit below checks out again
        conn.exec_driver_sql("SET lock_timeout = '2s'")
        submits_in = slot(conn)
    held = [db.engine.connect()]
    while slot(held[-1]) == submits_in:  # another backend, in another slot
        held.append(db.engine.connect())
    holder = held[-1]
    with holder.begin():
        jobs.count_queued(holder, DEFAULT_TEAM_ID, 1)  # its slot's row stays locked until this commits
        jobs.insert_job(db, method="rtn", model_ref="m", spec={}, secrets={}, priority=0, team_id=DEFAULT_TEAM_ID,
                        created_by=None, memory_estimate=None)  # LockNotAvailable after 2 s if it waited
        jobs.count_queued(holder, DEFAULT_TEAM_ID, -1)
    for conn in held:
        conn.close()
    assert _queued(db) == (1, 1)
    db.dispose()
