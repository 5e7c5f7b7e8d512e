"""The scheduler's claim on a real database (PostgreSQL and SQLite): priority, fair share, team limits, fencing."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from quantfarm.errors import LeaseLost
from storage import jobs
from storage.jobs import JobStatus, Lease
from storage.models import Artifact, Job, JobRun, utcnow
from storage.scheduler import claim_next, team_usage
from storage.teams import create_team


def team(db, name, max_running=None) -> str:
    with db.session() as s:
        return create_team(s, name, max_running=max_running).id


def queue(db, team_id=None, priority=0) -> str:
    with db.session() as s:
        return jobs.create_job(s, method="rtn", model_ref="m", spec={}, secrets={}, priority=priority, team_id=team_id).id


def claim(db, owner="w1", lease=60):
    with db.session() as s:
        return claim_next(s, owner, lease)


def finish(db, job, status=JobStatus.SUCCEEDED):
    with db.session() as s:
        jobs.transition(s, jobs.get_job(s, job.id), status, lease=Lease(job.lease_owner, job.claim))


def test_a_later_high_priority_job_runs_before_earlier_low_ones(db):
    lows = [queue(db, priority=0) for _ in range(3)]
    first = claim(db)
    assert first.id == lows[0]  # nothing better yet: the oldest
    high = queue(db, priority=5)
    finish(db, first)
    assert claim(db).id == high  # queued last, runs next
    assert claim(db, "w2").id == lows[1]


def test_fair_share_a_team_with_one_job_runs_second_behind_a_team_with_ten(db):
    a, b = team(db, "team-a"), team(db, "team-b")
    a_jobs = [queue(db, a) for _ in range(10)]
    b_job = queue(db, b)
    order = []
    for _ in range(4):
        job = claim(db)
        order.append(job.id)
        time.sleep(0.01)  # a run takes time: its team's worker-seconds grow
        finish(db, job)
    assert order == [a_jobs[0], b_job, a_jobs[1], a_jobs[2]]
    with db.session() as s:
        usage = team_usage(s, 3600)
    assert usage[a][1] == 3 and usage[b][1] == 1 and usage[a][0] > usage[b][0] > 0


def test_priority_beats_fair_share(db):
    a, b = team(db, "team-a"), team(db, "team-b")
    queue(db, a)
    time.sleep(0.01)
    finish(db, claim(db))  # team a has used the farm, team b not
    b_job = queue(db, b, priority=0)
    a_high = queue(db, a, priority=1)
    assert claim(db).id == a_high and claim(db).id == b_job


def test_team_running_limit_is_enforced_in_the_claim(db):
    limited, other = team(db, "limited", max_running=1), team(db, "other")
    l1, l2 = queue(db, limited, priority=9), queue(db, limited, priority=9)
    o1 = queue(db, other)
    assert claim(db, "w1").id == l1
    assert claim(db, "w2").id == o1  # l2 is better, but its team is at its limit
    assert claim(db, "w3") is None
    finish(db, jobs_get(db, l1))
    assert claim(db, "w3").id == l2


def test_concurrent_claims_respect_the_team_limit_and_each_job_goes_once(db):
    limited, other = team(db, "limited", max_running=1), team(db, "other")
    for _ in range(4):
        queue(db, limited)
    others = {queue(db, other) for _ in range(3)}
    won, barrier = [], threading.Barrier(6)

    def worker(i):
        barrier.wait()
        job = claim(db, f"w{i}")
        if job is not None:
            won.append((job.id, job.team_id))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [j for j, _ in won]
    assert len(ids) == len(set(ids)) == 4  # three of the other team's, one of the limited team's
    assert {j for j, t in won if t == other} == others and sum(t == limited for _, t in won) == 1


def jobs_get(db, job_id) -> Job:
    with db.session() as s:
        return jobs.get_job(s, job_id)


def test_the_claim_counter_rises_with_every_claim_and_attempt_does_not(db):
    job_id = queue(db)
    first = claim(db, "w1")
    assert (first.claim, first.attempt) == (1, 1)
    with db.session() as s:
        jobs.release(s, jobs.get_job(s, job_id), Lease("w1", 1), "preempted")
    second = claim(db, "w2")
    assert (second.id, second.claim, second.attempt) == (job_id, 2, 1)
    with db.session() as s:
        runs = [(r.claim, r.owner, r.outcome) for r in s.scalars(select(JobRun).where(JobRun.job_id == job_id).order_by(JobRun.id))]
    assert runs == [(1, "w1", "queued"), (2, "w2", None)]
    for stale in (Lease("w1", 1), Lease("w2", 1)):  # the old owner, or the right owner with an old token
        with pytest.raises(LeaseLost):
            with db.session() as s:
                jobs.set_stage(s, job_id, stale, jobs.Stage.UPLOADING)
        with pytest.raises(LeaseLost):
            with db.session() as s:
                jobs.transition(s, jobs.get_job(s, job_id), JobStatus.SUCCEEDED, lease=stale)
    assert jobs_get(db, job_id).status == "running"


def expire(db, job_id, seconds_ago=5):
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=seconds_ago)))


class Recorder:
    def __init__(self):
        self.sent = []

    def run_job(self, job_id):
        self.sent.append(job_id)


def test_the_sweeper_leaves_a_lease_renewed_after_its_read(db, monkeypatch):
    """Forced interleaving: the sweeper reads an expired lease, the worker renews, then the sweeper writes."""
    from quantfarm.settings import Settings
    from workers.sweeper import Sweeper

    job_id = queue(db)
    job = claim(db, "slow-worker")
    expire(db, job_id)
    real_get = jobs.get_job

    def read_then_the_worker_renews(s, jid, **kw):
        row = real_get(s, jid, **kw)  # the sweeper sees the lease expired ...
        with db.session() as other:  # ... and the worker's heartbeat commits before its write
            jobs.heartbeat(other, jid, Lease("slow-worker", job.claim), 60)
        return row

    monkeypatch.setattr(jobs, "get_job", read_then_the_worker_renews)
    rec = Recorder()
    out = Sweeper(Settings(), db, rec).sweep_once()
    monkeypatch.setattr(jobs, "get_job", real_get)
    assert out["requeued"] == [] and rec.sent == []
    after = jobs_get(db, job_id)
    assert (after.status, after.lease_owner, after.claim, after.attempt) == ("running", "slow-worker", 1, 1)
    assert after.lease_expires_at > utcnow()


def test_the_sweeper_judges_leases_by_the_database_clock(db):
    from quantfarm.settings import Settings
    from workers.sweeper import Sweeper

    job_id = queue(db)
    claim(db, "w1", lease=1.5)  # long enough for the first sweep on a loaded CI machine (0.3 s was not, once)
    rec = Recorder()
    assert Sweeper(Settings(), db, rec).sweep_once()["requeued"] == []  # still valid
    time.sleep(1.7)
    assert Sweeper(Settings(), db, rec).sweep_once()["requeued"] == [job_id] and rec.sent == [job_id]


def test_a_zombie_whose_job_was_taken_over_cannot_write_its_artifact(db):
    job_id = queue(db)
    zombie = claim(db, "zombie")
    expire(db, job_id)
    from quantfarm.settings import Settings
    from workers.sweeper import Sweeper

    assert Sweeper(Settings(), db, Recorder()).sweep_once()["requeued"] == [job_id]
    live = claim(db, "live")
    assert live.claim == zombie.claim + 1
    with pytest.raises(LeaseLost):  # the artifact row and the success commit together, or neither
        with db.session() as s:
            s.add(Artifact(id="art_zombie", job_id=job_id, kind="model", format="gptq", files=[], sha256="0" * 64))
            jobs.transition(s, jobs.get_job(s, job_id), JobStatus.SUCCEEDED, lease=Lease("zombie", zombie.claim))
    with db.session() as s:
        assert s.scalars(select(Artifact)).all() == []
        assert jobs.get_job(s, job_id).lease_owner == "live"


def test_the_sweeper_sends_a_bounded_number_of_wake_ups_not_one_per_queued_job(db):
    from quantfarm.settings import Settings
    from workers.sweeper import Sweeper

    ids = [queue(db) for _ in range(10)]
    with db.session() as s:  # they have all waited 20 minutes
        s.execute(update(Job).values(enqueued_at=utcnow() - timedelta(minutes=20)))
    rec = Recorder()
    sweeper = Sweeper(Settings(wakeup_batch=2), db, rec)
    for _ in range(5):
        sweeper.sweep_once()
    assert rec.sent == ids[:2]  # two wake-ups in the interval, then nothing until it has passed
    fresh = Recorder()
    Sweeper(Settings(), db, fresh).sweep_once()
    assert len(fresh.sent) == 4  # the default batch
    Sweeper(Settings(requeue_queued_after_seconds=3600), db, fresh).sweep_once()
    assert len(fresh.sent) == 4  # nobody has waited an hour: no wake-up
