"""Cancel within seconds in any stage, and the stall watchdog, on a real database.

A stage is made to hang (a pure-Python wait inside the job's thread, as a stuck fetch,
export or upload would) right after it starts; the heartbeat thread must stop it.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from quantfarm.settings import Settings
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from storage import jobs
from storage.artifacts import LocalStore
from storage.jobs import Stage
from storage.layout import artifact_prefix
from storage.models import JobEvent
from workers.runner import JobRunner

CAL = {"num_samples": 4, "seq_len": 64}
HANG_LIMIT = 30.0


def submit(db, body) -> str:
    spec = parse_spec(body)
    with db.session() as s:
        return jobs.create_job(s, method=spec.method, model_ref="test", spec=public_spec(spec), secrets=spec_secrets(spec)).id


def hang() -> None:
    deadline = time.monotonic() + HANG_LIMIT
    while time.monotonic() < deadline:
        time.sleep(0.02)
    raise AssertionError("the stage was never interrupted")


class HangsIn(JobRunner):
    """Hangs in ``stage`` (after its first file, for uploads), cancelling itself first when asked."""

    def __init__(self, *a, stage: Stage, cancel: bool, **kw):
        super().__init__(*a, **kw)
        self.hang_stage, self.cancel = stage, cancel
        self.hung_at: float | None = None
        if stage == Stage.UPLOADING:
            self.store = _HangingUpload(self.store, self)

    def _stage(self, job_id, stage):
        super()._stage(job_id, stage)
        if stage == self.hang_stage and stage != Stage.UPLOADING:
            self._hang(job_id)

    def _hang(self, job_id):
        if self.cancel:
            with self.db.session() as s:
                jobs.request_cancel(s, job_id)
        self.hung_at = time.monotonic()
        hang()


class _HangingUpload(LocalStore):
    def __init__(self, inner, runner):
        super().__init__(inner.root)
        self.runner, self.puts = runner, 0

    def put_file(self, key, path):
        super().put_file(key, path)
        if "/artifacts/" in key:
            self.puts += 1
            if self.puts == 1:
                self.runner._hang(self.runner.current_job)


@pytest.fixture
def env(db, tmp_path):
    settings = Settings(home=tmp_path / "home", lease_seconds=30, heartbeat_seconds=0.2)
    return settings, db, LocalStore(tmp_path / "store")


@pytest.mark.parametrize("stage", [Stage.FETCHING, Stage.CALIBRATING, Stage.EXPORTING, Stage.UPLOADING])
def test_cancel_stops_a_stuck_stage_within_seconds(env, tiny_llama, stage):
    settings, db, store = env
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "gptq", "calibration": CAL})
    runner = HangsIn(settings, db, store, stage=stage, cancel=True)
    assert runner.run(job_id) == "cancelled"
    took = time.monotonic() - runner.hung_at
    assert took < 5, took
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    assert job.status == "cancelled" and job.lease_owner is None and job.stage is None
    assert [e.stage for e in events if e.kind == "stage"][-1] == stage.value
    assert events[-1].message.startswith("Cancelled while running")
    assert store.list(artifact_prefix(job_id, job.claim)) == []  # a cut-short upload leaves nothing behind
    assert runner.drain() == []  # and the runner is fine afterwards


@pytest.mark.parametrize("attempts,status,code", [(2, "queued", None), (1, "failed", "stalled")])
def test_the_watchdog_hands_back_a_job_whose_progress_stopped(env, tiny_llama, attempts, status, code):
    settings, db, store = env
    settings = settings.model_copy(update={"stall_seconds": 1.5, "max_attempts": attempts})
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    woken = []
    runner = HangsIn(settings, db, store, stage=Stage.FETCHING, cancel=False, wake=woken.append)  # a fetch that hangs
    assert runner.run(job_id) == "stalled"
    assert time.monotonic() - runner.hung_at < 6
    with db.session() as s:
        job = jobs.get_job(s, job_id)
    assert (job.status, job.error_code, job.lease_owner) == (status, code, None)
    assert job.attempt == (2 if status == "queued" else 1)  # a stall spends an attempt
    assert woken == ([job_id] if status == "queued" else [])
    if status == "queued":  # another run resumes it normally
        assert JobRunner(settings.model_copy(update={"stall_seconds": 600}), db, store).run(job_id) == "succeeded"


class SlowFetch(JobRunner):
    """A download that takes 4.5 s and keeps writing bytes into the scratch folder.

    Once it is done the watchdog is relaxed: what this checks is the fetch, not how long
    the engine's first imports take on a loaded machine.
    """

    def _fetch(self, spec, secrets, scratch, hold):
        scratch.mkdir(parents=True, exist_ok=True)
        with open(scratch / "partial.bin", "wb") as f:
            for _ in range(45):
                f.write(b"x" * 4096)
                f.flush()
                time.sleep(0.1)
        self.settings = self.settings.model_copy(update={"stall_seconds": 600})
        return super()._fetch(spec, secrets, scratch, hold)


def test_a_slow_fetch_that_keeps_receiving_bytes_is_not_stalled(env, tiny_llama):
    settings, db, store = env
    settings = settings.model_copy(update={"stall_seconds": 1.5})
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    assert SlowFetch(settings, db, store).run(job_id) == "succeeded"
