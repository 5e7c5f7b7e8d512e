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
