"""The runner's claims on a real database: pull order, fencing of a zombie's writes, preemption.

The broker is not involved (the runner is a plain object); tests/e2e drive real workers.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from quantfarm.settings import Settings
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from storage import jobs
from storage.artifacts import LocalStore
from storage.jobs import Stage
from storage.layout import artifact_prefix, checkpoint_prefix, stored_prefix
from storage.models import Artifact, Job, JobEvent, JobRun, utcnow
from workers.runner import JobRunner

CAL = {"num_samples": 4, "seq_len": 64}


def submit(db, body, priority=0) -> str:
    spec = parse_spec(body)
    with db.session() as s:
        return jobs.create_job(s, method=spec.method, model_ref="test", spec=public_spec(spec),
                               secrets=spec_secrets(spec), priority=priority).id


@pytest.fixture
def env(db, tmp_path):
    return Settings(home=tmp_path / "home", lease_seconds=30), db, LocalStore(tmp_path / "store")


def load(db, job_id):
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        arts = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        return job, arts, events


def test_a_woken_worker_runs_the_best_job_then_looks_for_more(env, tiny_llama):
    settings, db, store = env
    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"}
    low1, low2 = submit(db, body), submit(db, body)
    high = submit(db, body, priority=3)
    ran = JobRunner(settings, db, store).drain()
    assert ran == [(high, "succeeded"), (low1, "succeeded"), (low2, "succeeded")]
    assert JobRunner(settings, db, store).drain() == []  # a wake-up with nothing to do


class Zombie(JobRunner):
    """Stalls at upload while the sweeper gives its job away (its lease expired)."""

    def _stage(self, job_id, stage):
        super()._stage(job_id, stage)
        if stage == Stage.UPLOADING:
            from workers.sweeper import Sweeper

            with self.db.session() as s:
                s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=5)))
            assert Sweeper(self.settings, self.db, _NoBroker()).sweep_once()["requeued"] == [job_id]


class _NoBroker:
    def run_job(self, job_id):
        pass


def test_a_zombie_workers_artifact_write_is_refused_by_the_fence(env, tiny_llama):
    settings, db, store = env
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    assert Zombie(settings, db, store).run(job_id) == "lease_lost"
    job, arts, _ = load(db, job_id)
    assert job.status == "queued" and arts == [] and job.claim == 1
    zombie_files = store.list(artifact_prefix(job_id, 1))
    assert zombie_files  # it wrote only under its own claim's prefix

    assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, (art,), _ = load(db, job_id)
    assert job.claim == 2 and art.store_prefix == artifact_prefix(job_id, 2) == stored_prefix(art)
    assert len(store.list(artifact_prefix(job_id, 2))) == art.file_count


class PreemptAfterFirstLayer(JobRunner):
    """Gets SIGTERM while layer 0 is being quantized (the flag the signal handler sets)."""

    def _stage(self, job_id, stage):
        super()._stage(job_id, stage)
        if stage == Stage.CALIBRATING:
            self.preempting = True


def test_preemption_requeues_without_spending_an_attempt_and_the_output_is_identical(env, tiny_llama):
    settings, db, store = env
    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": "gptq", "calibration": CAL}
    calm, preempted = submit(db, body), submit(db, {**body, "reuse": False})  # computed again, not reused
    assert JobRunner(settings, db, store).run(calm) == "succeeded"

    runner = PreemptAfterFirstLayer(settings, db, store)
    assert runner.run(preempted) == "preempted"
    job, arts, events = load(db, preempted)
    assert (job.status, job.attempt, job.claim, job.lease_owner, job.layers_done) == ("queued", 1, 1, None, 1)
    assert arts == [] and store.list(checkpoint_prefix(preempted))  # layer 0's checkpoint is kept
    assert events[-1].data.get("preempted") is True
    assert runner.drain() == []  # a preempted worker claims nothing more

    assert JobRunner(settings, db, store).run(preempted) == "succeeded"
    job, (art,), events = load(db, preempted)
    assert (job.attempt, job.claim) == (1, 2)
    assert [e.data["resumed"] for e in events if e.kind == "progress"][-2:] == [True, False]
    _, (calm_art,), _ = load(db, calm)
    ours = {f["path"]: f["sha256"] for f in art.files}
    theirs = {f["path"]: f["sha256"] for f in calm_art.files}
    assert ours == theirs  # byte-identical to the undisturbed run
    with db.session() as s:
        outcomes = [r.outcome for r in s.scalars(select(JobRun).where(JobRun.job_id == preempted).order_by(JobRun.id))]
    assert outcomes == ["queued", "succeeded"]


def test_two_worker_classes_a_big_job_is_handed_on_to_the_big_worker(env, tiny_llama):
    """Worker classes by settings: the tiny model's estimate (~0.5 GiB) fits only the big one."""
    from quantfarm.memory import estimate_for_spec
    from storage import farm
    from workers.presence import Presence

    settings, db, store = env
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    need = estimate_for_spec(json.loads((tiny_llama / "config.json").read_text()), load(db, job_id)[0].spec)
    small = JobRunner(settings.model_copy(update={"worker_memory_bytes": need // 2}), db, store, owner="small")
    big = JobRunner(settings.model_copy(update={"worker_memory_bytes": need * 4}), db, store, owner="big")
    for runner in (small, big):
        Presence(db, runner, 60).register()
    woken = []
    small.wake = woken.append
    assert small.drain() == [(job_id, "handed_on")]  # unknown until fetched; then too big for it
    job, arts, events = load(db, job_id)
    assert (job.status, job.memory_estimate, job.attempt, job.claim) == ("queued", need, 1, 1)
    assert events[-1].data.get("handed_on") is True and woken == [job_id]
    assert small.drain() == []  # it no longer claims what it cannot hold
    assert big.drain() == [(job_id, "succeeded")]

    with db.session() as s:
        farm.unregister(s, "big")
    same = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    assert small.run(same) == "succeeded" and load(db, same)[0].reused_from == job_id  # reusing needs no memory
    other = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "reuse": False})
    assert small.run(other) == "failed"  # bigger than every worker left on the farm
    job, _, _ = load(db, other)
    assert job.error_code == "too_large" and f"{need / 1024**3:.1f} GiB" in job.error_message


def test_the_eta_after_a_resume_counts_only_this_attempts_computed_layers():
    """Replayed layers take a fraction of a computed one's time: they neither set nor shorten the ETA."""
    import time
    from types import SimpleNamespace

    from workers.engine.pipeline import LoopStats, _report

    reports = []
    stats = LoopStats()
    ckpt = SimpleNamespace(layers={3: {"seconds": 2.0, "losses": {}}, 4: {"seconds": 4.0, "losses": {}}})
    long_ago = time.monotonic() - 100  # the attempt began long ago (fetch, capture, replays)
    stats.replayed += [0, 1, 2]
    _report(reports.append, 2, 10, 0.01, ckpt, True, stats, time.monotonic() - 0.03)
    assert reports[-1].eta_seconds is None  # only replays so far: no guess from their speed
    stats.computed += [3]
    _report(reports.append, 3, 10, 2.0, ckpt, False, stats, long_ago)
    assert reports[-1].eta_seconds == 2.0 * 6
    stats.computed += [4]
    _report(reports.append, 4, 10, 4.0, ckpt, False, stats, long_ago)
    assert reports[-1].eta_seconds == 3.0 * 5
    fresh = LoopStats()  # a first attempt, nothing computed yet: elapsed time per layer
    _report(reports.append, 0, 4, 0.0, SimpleNamespace(layers={}), False, fresh, time.monotonic() - 1.0)
    assert 2.9 <= reports[-1].eta_seconds <= 3.5
