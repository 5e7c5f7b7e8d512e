"""Dedup on a real database: an identical job reuses a result, identical running jobs coalesce, trust holds.

The runner is driven in-process (no broker); the Hub is the stand-in of tests/support/hubserver.py
(no real Hub can be reached from tests), spoken to over HTTP by the real fetch code.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from quantfarm.settings import Settings
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from quantfarm.store import walk_files
from storage import jobs
from storage.artifacts import LocalStore
from storage.jobs import Stage
from storage.layout import stored_prefix
from storage.models import Artifact, JobEvent, WebhookDelivery
from storage.teams import create_team
from storage.views import event_view, job_view
from workers.runner import JobRunner

CAL = {"texts": ["def f(x):\n    return x * 2\n" * 8, "for i in range(10):\n    print(i)\n" * 8], "num_samples": 4, "seq_len": 32}
PG_ONLY = pytest.mark.parametrize("db", ["postgresql"], indirect=True)


def body(path, **kw):
    return {"model": {"source": "local", "path": str(path)}, "method": "gptq", "calibration": CAL, "evaluate": False, **kw}


def submit(db, spec_body, team_id=None) -> str:
    spec = parse_spec(spec_body)
    with db.session() as s:
        return jobs.create_job(s, method=spec.method, model_ref="test", spec=public_spec(spec),
                               secrets=spec_secrets(spec), team_id=team_id).id


def load(db, job_id):
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        arts = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.created_at)))
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        view = job_view(job, arts)
        s.expunge_all()
        return job, arts, events, view


def layers_computed(events) -> list[int]:
    return [e.data["layers_done"] for e in events if e.kind == "progress" and not e.data.get("resumed")]


def files_of(store, art) -> dict[str, bytes]:
    return {f["path"]: store.get_bytes(f"{stored_prefix(art)}/{f['path']}") for f in art.files}


@pytest.fixture
def env(db, tmp_path):
    return Settings(home=tmp_path / "home", lease_seconds=30), db, LocalStore(tmp_path / "store")


def test_an_identical_job_reuses_the_artifact_and_fires_its_own_webhooks(env, tiny_llama):
    settings, db, store = env
    first = submit(db, body(tiny_llama))
    assert JobRunner(settings, db, store).run(first) == "succeeded"
    second = submit(db, body(tiny_llama, webhooks=[{"url": "https://ci.example/hook"}], labels={"n": "2"}, priority=2))
    assert JobRunner(settings, db, store).run(second) == "succeeded"
    one, (art1,), ev1, _ = load(db, first)
    two, (art2,), ev2, view = load(db, second)
    assert layers_computed(ev1) == [1, 2] and layers_computed(ev2) == []  # no layer was quantized again
    assert [e.stage for e in ev2 if e.kind == "stage"] == ["fetching", "uploading"]
    assert view["reused_from"] == first and two.metrics["reused"] is True
    assert two.metrics["layer_losses"] == one.metrics["layer_losses"]
    # The same bytes, copied under the job's own prefix (its own retention, no other job's key in sight).
    assert art2.sha256 == art1.sha256 and art2.files == art1.files
    assert art2.store_prefix.startswith(f"jobs/{second}/") and files_of(store, art2) == files_of(store, art1)
    assert art2.fingerprint == art1.fingerprint == two.fingerprint is not None
    with db.session() as s:
        hooks = list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == second)))
    assert [h.event_type for h in hooks] == ["job.succeeded"]
    # A third reuses as well (from either: the same bytes).
    third = submit(db, body(tiny_llama))
    assert JobRunner(settings, db, store).run(third) == "succeeded"
    assert load(db, third)[3]["reused_from"] in (first, second)


@PG_ONLY
def test_a_different_calibration_set_engine_version_or_reuse_false_computes_again(env, tiny_llama, monkeypatch):
    settings, db, store = env
    first = submit(db, body(tiny_llama))
    assert JobRunner(settings, db, store).run(first) == "succeeded"
    other_cal = submit(db, body(tiny_llama, calibration={**CAL, "texts": ["x = 1\n" * 40]}))
    opted_out = submit(db, body(tiny_llama, reuse=False))
    for job_id in (other_cal, opted_out):
        assert JobRunner(settings, db, store).run(job_id) == "succeeded"
        job, (art,), events, view = load(db, job_id)
        assert layers_computed(events) == [1, 2] and view["reused_from"] is None and "reused" not in job.metrics
    assert load(db, opted_out)[1][0].fingerprint is None  # it neither reuses nor offers its result
    monkeypatch.setattr("workers.engine.pipeline.ENGINE_VERSION", "9.9.9")
    newer = submit(db, body(tiny_llama))
    assert JobRunner(settings, db, store).run(newer) == "succeeded"
    assert layers_computed(load(db, newer)[2]) == [1, 2] and load(db, newer)[3]["reused_from"] is None


class HeldAtCalibration(JobRunner):
    """Stops at the start of calibration until told to go on, so an identical job can arrive meanwhile."""

    go = None

    def _stage(self, job_id, stage):
        super()._stage(job_id, stage)
        if stage == Stage.CALIBRATING:
            assert self.go.wait(60)


def test_two_identical_concurrent_jobs_run_once(env, tiny_llama):
    settings, db, store = env
    first, second = submit(db, body(tiny_llama)), submit(db, body(tiny_llama))
    leader = HeldAtCalibration(settings, db, store)
    leader.go = threading.Event()
    results = {}
    threads = [threading.Thread(target=lambda: results.__setitem__(first, leader.run(first))),
               threading.Thread(target=lambda: results.__setitem__(second, JobRunner(settings, db, store).run(second)))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while load(db, first)[0].stage != "calibrating" and time.monotonic() < deadline:
        time.sleep(0.1)
    threads[1].start()
    while not any(e.kind == "log" for e in load(db, second)[2]) and time.monotonic() < deadline:
        time.sleep(0.1)
    waiting = [e for e in load(db, second)[2] if e.kind == "log"]
    assert waiting and waiting[0].data == {"coalesced_onto": first} and load(db, second)[0].status == "running"
    leader.go.set()
    for t in threads:
        t.join(120)
    assert results == {first: "succeeded", second: "succeeded"}
    _, (art1,), ev1, _ = load(db, first)
    _, (art2,), ev2, view = load(db, second)
    assert layers_computed(ev1) == [1, 2] and layers_computed(ev2) == []
    assert view["reused_from"] == first and art2.sha256 == art1.sha256


@PG_ONLY
def test_a_gate_failed_artifact_is_never_reused(env, tiny_llama):
    settings, db, store = env
    gated = body(tiny_llama, evaluate=True, evaluation={"max_windows": 2}, gate={"max_ppl_increase_pct": -90})
    first = submit(db, gated)
    assert JobRunner(settings, db, store).run(first) == "failed"
    _, (art,), _, _ = load(db, first)
    assert art.kind == "gate_failed" and art.fingerprint is None
    second = submit(db, gated)
    assert JobRunner(settings, db, store).run(second) == "failed"
    job, _, events, view = load(db, second)
    assert job.error_code == "quality_gate" and layers_computed(events) == [1, 2] and view["reused_from"] is None


@PG_ONLY
def test_another_teams_private_source_is_reused_only_by_a_job_that_can_read_it(env, tiny_llama, tmp_path):
    from tests.support.hubserver import HubServer

    settings, db, store = env
    with db.session() as s:
        team_a, team_b = create_team(s, "alpha").id, create_team(s, "beta").id
    with HubServer() as hub:
        hub.add_repo("org/private-llama", {p.relative_to(tiny_llama).as_posix(): p.read_bytes() for p in walk_files(tiny_llama)},
                     private=True)
        hub.add_token("hf_alpha", write=False, read={"org/private-llama"})
        hub.add_token("hf_beta", write=False, read={"org/private-llama"})
        settings = Settings(home=tmp_path / "home", lease_seconds=30, hf_endpoint=hub.endpoint, model_cache_bytes=0)

        def hub_body(token=None):
            model = {"source": "hub", "repo_id": "org/private-llama", **({"token": token} if token else {})}
            return {**body(tiny_llama), "model": model}

        a = submit(db, hub_body("hf_alpha"), team_a)
        assert JobRunner(settings, db, store).run(a) == "succeeded"
        # Without a token, team beta cannot read the model: nothing is reused, nothing of alpha's shows.
        b_blind = submit(db, hub_body(), team_b)
        assert JobRunner(settings, db, store).run(b_blind) == "failed"
        job, arts, events, view = load(db, b_blind)
        assert job.error_code == "model_not_found" and arts == [] and view["reused_from"] is None
        # With its own token it could compute the same bytes itself: it gets them, but never alpha's job id.
        b_own = submit(db, hub_body("hf_beta"), team_b)
        assert JobRunner(settings, db, store).run(b_own) == "succeeded"
        job, (art,), events, view = load(db, b_own)
    _, (art_a,), _, _ = load(db, a)
    assert layers_computed(events) == [] and view["reused_from"] == "another_team" and art.sha256 == art_a.sha256
    assert a not in repr(view) and a not in repr([event_view(e) for e in events])
    assert art.store_prefix.startswith(f"jobs/{b_own}/")


@PG_ONLY
def test_a_job_waiting_for_an_identical_one_is_cancelled_within_seconds(env, tiny_llama):
    settings, db, store = env
    settings = settings.model_copy(update={"heartbeat_seconds": 0.5})
    first, second = submit(db, body(tiny_llama)), submit(db, body(tiny_llama))
    leader = HeldAtCalibration(settings, db, store)
    leader.go = threading.Event()
    results = {}
    lead = threading.Thread(target=lambda: results.__setitem__(first, leader.run(first)))
    lead.start()
    deadline = time.monotonic() + 60
    while load(db, first)[0].stage != "calibrating" and time.monotonic() < deadline:
        time.sleep(0.1)
    follow = threading.Thread(target=lambda: results.__setitem__(second, JobRunner(settings, db, store).run(second)))
    follow.start()
    while not any(e.kind == "log" for e in load(db, second)[2]) and time.monotonic() < deadline:
        time.sleep(0.1)
    with db.session() as s:
        jobs.request_cancel(s, second)
    asked = time.monotonic()
    follow.join(30)
    assert results.get(second) == "cancelled" and time.monotonic() - asked < 10
    assert load(db, second)[0].status == "cancelled" and load(db, first)[0].status == "running"
    leader.go.set()
    lead.join(120)
    assert results[first] == "succeeded"


class PreemptedAfterFirstLayer(JobRunner):
    """Asked to stop as soon as the job calibrates: it hands the job back after layer 0's checkpoint."""

    def _stage(self, job_id, stage):
        super()._stage(job_id, stage)
        if stage == Stage.CALIBRATING:
            self.preempting = True


@pytest.fixture
def bf16_llama(tokenizer_dir, tmp_path_factory):
    import torch

    from tests.support.models import make_tiny_model
    from workers.engine.model import prefer_cpu_bf16

    yield make_tiny_model(tmp_path_factory.mktemp("bf16") / "llama", "llama", tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16)
    prefer_cpu_bf16(None)  # the runners below set this process's choice


@PG_ONLY
def test_a_resumed_job_is_reused_as_the_dtype_it_was_computed_in(env, bf16_llama):
    """Checkpoints made in bf16 and resumed by a float32 worker: the result is bf16's, so only bf16 jobs may reuse it."""
    settings, db, store = env
    bf16, float32 = (settings.model_copy(update={"cpu_bf16": on}) for on in (True, False))
    first = submit(db, body(bf16_llama))
    assert PreemptedAfterFirstLayer(bf16, db, store).run(first) == "preempted"
    assert JobRunner(float32, db, store).run(first) == "succeeded"  # resumes from layer 0, in the recorded bf16
    events = load(db, first)[2]
    assert layers_computed(events) == [1, 2] and [e.data["layers_done"] for e in events if e.kind == "progress"
                                                  and e.data.get("resumed")] == [1]  # layer 0 replayed, not computed again
    on_bf16 = submit(db, body(bf16_llama))
    assert JobRunner(bf16, db, store).run(on_bf16) == "succeeded"
    assert load(db, on_bf16)[3]["reused_from"] == first
    on_float32 = submit(db, body(bf16_llama))
    assert JobRunner(float32, db, store).run(on_float32) == "succeeded"
    _, (art,), events, view = load(db, on_float32)
    assert view["reused_from"] is None and layers_computed(events) == [1, 2]
    assert art.sha256 != load(db, first)[1][0].sha256  # float32 compute: other bytes
