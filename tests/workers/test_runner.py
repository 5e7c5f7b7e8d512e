"""The job runner on a real database (PostgreSQL and SQLite), driven in-process.

The broker is not involved here (the runner is a plain object); the end-to-end
tests exercise the Celery worker and the filesystem/Redis brokers.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import select

from quantfarm.settings import Settings
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from storage import jobs
from storage.artifacts import LocalStore
from storage.jobs import JobStatus
from storage.models import Artifact, JobEvent
from storage.layout import checkpoint_prefix, stored_prefix
from workers.runner import JobRunner

CAL = {"num_samples": 4, "seq_len": 64}


def submit(db, body) -> str:
    spec = parse_spec(body)
    with db.session() as s:
        job = jobs.create_job(s, method=spec.method, model_ref="test", spec=public_spec(spec), secrets=spec_secrets(spec))
        return job.id


@pytest.fixture
def env(db, tmp_path):
    settings = Settings(home=tmp_path / "home", lease_seconds=30)
    store = LocalStore(tmp_path / "store")
    return settings, db, store


def load(db, job_id):
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        arts = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        return job, events, arts


def test_rtn_job_succeeds_and_records_its_artifact(env, tiny_llama):
    settings, db, store = env
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32}})
    assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, events, arts = load(db, job_id)
    assert job.status == "succeeded" and job.error_code is None and job.stage is None
    assert (job.layers_done, job.layers_total) == (2, 2)
    assert job.lease_owner is None and job.finished_at is not None
    assert [e.to_status for e in events if e.kind == "status"] == ["queued", "running", "succeeded"]
    # Evaluation is on by default.
    assert [e.stage for e in events if e.kind == "stage"] == ["fetching", "calibrating", "exporting", "evaluating", "uploading"]
    assert job.metrics["perplexity_after"] > 0 and job.metrics["eval_tokens"] > 0
    assert [e.data["layers_done"] for e in events if e.kind == "progress"] == [1, 2]
    (art,) = arts
    assert art.format == "gptq" and art.file_count == len(art.files) > 3
    assert art.store_prefix == f"jobs/{job_id}/artifacts/{job.claim}" and job.claim == 1
    for f in art.files:  # every recorded file is in the store with its size and sha256
        blob = store.get_bytes(f"{stored_prefix(art)}/{f['path']}")
        assert len(blob) == f["size"] and hashlib.sha256(blob).hexdigest() == f["sha256"]
    config = json.loads(store.get_bytes(f"{stored_prefix(art)}/config.json"))
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["group_size"] == 32
    assert store.list(checkpoint_prefix(job_id)) == []  # checkpoints are dropped after success
    assert job.metrics["size_bytes_after"] < job.metrics["size_bytes_before"]


@pytest.mark.parametrize(
    "path_kind,code",
    [("missing", "model_not_found"), ("empty", "not_a_model"), ("bert", "unsupported_architecture")],
)
def test_bad_models_fail_with_clear_codes(env, tmp_path, path_kind, code):
    from tests.support.models import add_bert

    settings, db, store = env
    path = tmp_path / path_kind
    if path_kind == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("no model here")
    elif path_kind == "bert":
        add_bert(path)
    job_id = submit(db, {"model": {"source": "local", "path": str(path)}, "method": "gptq", "calibration": CAL})
    assert JobRunner(settings, db, store).run(job_id) == "failed"
    job, events, arts = load(db, job_id)
    assert job.status == "failed" and job.error_code == code
    assert job.error_message and str(path) in job.error_message or code == "unsupported_architecture"
    if code == "unsupported_architecture":
        assert "llama" in job.error_message and "bert" in job.error_message
    assert arts == [] and job.lease_owner is None


def test_second_claim_is_skipped(env, tiny_llama):
    settings, db, store = env
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    with db.session() as s:
        assert jobs.claim(s, job_id, "other-worker", 60) is not None
    assert JobRunner(settings, db, store).run(job_id) == "skipped"
    job, _, _ = load(db, job_id)
    assert job.status == "running" and job.lease_owner == "other-worker"


class CancelAtCalibration(JobRunner):
    """Requests a cancel the moment calibration starts, like a user clicking Cancel."""

    def _stage(self, job_id, stage):
        super()._stage(job_id, stage)
        if stage.value == "calibrating":
            with self.db.session() as s:
                jobs.request_cancel(s, job_id)


def test_cancel_stops_at_layer_boundary_and_retry_resumes(env, tiny_llama):
    settings, db, store = env
    # The heartbeat thread never beats here, so the cancel is seen at the layer boundary (not mid-layer).
    settings = settings.model_copy(update={"heartbeat_seconds": 600})
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "gptq", "calibration": CAL})
    assert CancelAtCalibration(settings, db, store).run(job_id) == "cancelled"
    job, events, arts = load(db, job_id)
    assert job.status == "cancelled" and job.layers_done == 1 and arts == []
    manifest = json.loads(store.get_bytes(f"{checkpoint_prefix(job_id)}/manifest.json"))
    assert sorted(manifest["layers"]) == ["0"]  # the finished layer's checkpoint stays
    with db.session() as s:
        jobs.retry(s, job_id)
    assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, events, arts = load(db, job_id)
    assert job.attempt == 2 and len(arts) == 1
    resumed = [e.data["resumed"] for e in events if e.kind == "progress"][-2:]
    assert resumed == [True, False]  # layer 0 replayed from its checkpoint, layer 1 computed


def test_sweeper_requeues_expired_lease_and_fails_after_max_attempts(env, tiny_llama):
    import time

    from workers.sweeper import Sweeper

    settings, db, store = env
    settings = settings.model_copy(update={"max_attempts": 2})

    class Recorder:
        def __init__(self):
            self.sent = []

        def run_job(self, job_id):
            self.sent.append(job_id)

    rec = Recorder()
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    with db.session() as s:
        jobs.claim(s, job_id, "dead-worker", 0.2)
    time.sleep(0.4)  # leases are judged by the database clock
    out = Sweeper(settings, db, rec).sweep_once()
    assert out["requeued"] == [job_id] and rec.sent == [job_id]
    job, events, _ = load(db, job_id)
    assert job.status == "queued" and job.attempt == 2 and job.lease_owner is None and job.claim == 1
    with db.session() as s:
        assert jobs.claim(s, job_id, "dead-again", 0.2).claim == 2
    time.sleep(0.4)
    out = Sweeper(settings, db, rec).sweep_once()
    job, _, _ = load(db, job_id)
    assert out["failed"] == [job_id] and job.status == "failed" and job.error_code == "worker_lost"
    assert JobStatus(job.status).terminal


class _CannotDelete(LocalStore):
    def delete_prefix(self, prefix: str) -> None:
        raise OSError("the store refused the delete")


def test_a_failed_checkpoint_cleanup_after_success_keeps_the_job_succeeded(env, tiny_llama, caplog):
    settings, db, _ = env
    store = _CannotDelete(settings.home / "store")
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32}})
    assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, events, arts = load(db, job_id)
    assert job.status == "succeeded" and job.error_code is None and len(arts) == 1
    assert [e.to_status for e in events if e.kind == "status"] == ["queued", "running", "succeeded"]
    assert store.list(checkpoint_prefix(job_id))  # left behind, and said so
    assert "checkpoints could not be deleted (OSError" in caplog.text


def test_cancel_of_a_job_that_ends_meanwhile_is_409_and_leaves_it_alone(db, monkeypatch):
    from quantfarm.errors import InvalidState

    job_id = submit(db, {"model": {"source": "local", "path": "/m"}, "method": "rtn"})
    with db.session() as s:
        assert jobs.claim(s, job_id, "w1", 30) is not None
    real_get = jobs.get_job

    def read_then_the_worker_finishes(s, jid, **kw):
        job = real_get(s, jid, **kw)  # the cancel reads it running ...
        with db.session() as other:  # ... and the worker's terminal move commits before its write
            jobs.transition(other, real_get(other, jid), JobStatus.SUCCEEDED, owner="w1")
        return job

    monkeypatch.setattr(jobs, "get_job", read_then_the_worker_finishes)
    with pytest.raises(InvalidState, match="is succeeded"):
        with db.session() as s:
            jobs.request_cancel(s, job_id)
    monkeypatch.setattr(jobs, "get_job", real_get)
    job, events, _ = load(db, job_id)
    assert job.status == "succeeded" and not job.cancel_requested
    assert not any((e.data or {}).get("cancel_requested") for e in events)


def test_an_unexpected_error_fails_the_job_with_internal_error_and_the_runner_goes_on(env, tiny_llama, monkeypatch, caplog):
    """A bug in a stage must end the job `failed`, never leave it running until its lease runs out."""
    import workers.engine.run as engine_run

    settings, db, store = env
    real = engine_run.quantize

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero in a method")

    monkeypatch.setattr(engine_run, "quantize", broken)
    bad = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    runner = JobRunner(settings, db, store)
    assert runner.run(bad) == "failed"
    job, events, arts = load(db, bad)
    assert job.status == "failed" and job.error_code == "internal_error" and arts == []
    assert "ZeroDivisionError: division by zero in a method" in job.error_message
    assert job.lease_owner is None and job.finished_at is not None
    assert "unexpected error" in caplog.text  # the traceback goes to the worker log

    monkeypatch.setattr(engine_run, "quantize", real)
    good = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32}})
    assert runner.run(good) == "succeeded"  # the same runner takes the next job


def test_a_job_that_fails_its_gate_keeps_its_artifact_and_publishes_nothing(env, tiny_llama, tmp_path):
    """A gate no quantization can clear: the job fails with quality_gate, the artifact is kept and marked,
    and the Hub stand-in (tests/support/hubserver.py: the real Hub is unreachable here) receives nothing."""
    from tests.support.hubserver import HubServer

    settings, db, store = env
    with HubServer() as hub:
        hub.add_token("hf_write_gate", write=True)
        settings = Settings(home=tmp_path / "home", lease_seconds=30, hf_endpoint=hub.endpoint)
        job_id = submit(db, {
            "model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32},
            "calibration": CAL, "evaluation": {"max_windows": 2}, "gate": {"max_ppl_increase_pct": -90},
            "destination": {"store": False, "hub": {"repo_id": "team/gated", "token": "hf_write_gate"}},
        })
        assert JobRunner(settings, db, store).run(job_id) == "failed"
        assert hub.uploads == [] and hub.created == [] and "team/gated" not in hub.repos
    job, events, arts = load(db, job_id)
    assert (job.status, job.error_code) == ("failed", "quality_gate")
    gate = job.metrics["gate"]
    assert gate["passed"] is False and gate["max_ppl_increase_pct"] == -90
    assert gate["perplexity_before"] == job.metrics["perplexity_before"] > 0
    assert gate["ppl_increase_pct"] == round((job.metrics["perplexity_after"] / job.metrics["perplexity_before"] - 1) * 100, 4)
    assert f"{gate['ppl_increase_pct']:.2f}%" in job.error_message
    (art,) = arts  # kept, even though the destination said store: false, and marked
    assert art.kind == "gate_failed" and art.hub_url is None and art.location is not None
    for f in art.files:
        assert store.get_bytes(f"{stored_prefix(art)}/{f['path']}") is not None
    assert "evaluating" in [e.stage for e in events if e.kind == "stage"]


def test_a_gate_the_job_clears_lets_it_succeed(env, tiny_llama):
    settings, db, store = env
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32},
                         "calibration": CAL, "evaluation": {"max_windows": 2}, "gate": {"max_ppl_increase_pct": 1000}})
    assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, _, (art,) = load(db, job_id)
    assert job.metrics["gate"]["passed"] is True and art.kind == "model"


def test_a_hub_sourced_job_names_the_commit_it_quantized(env, tiny_llama, tmp_path, monkeypatch):
    """The Hub stand-in (tests/support/hubserver.py; the real Hub is unreachable) serves two commits of a model;
    the job asked for "main" and its metrics, artifact row, artifact API view, card and card front matter name the
    head commit it got."""
    from api.schemas import ArtifactOut
    from quantfarm.store import walk_files
    from storage.views import artifact_view
    from workers.engine import shards
    from storage.hub import card_metadata
    from tests.support.hubserver import HubServer

    settings, db, store = env
    files = {p.relative_to(tiny_llama).as_posix(): p.read_bytes() for p in walk_files(tiny_llama)}
    with HubServer() as hub:
        old = hub.add_repo("org/tiny-llama", files)
        head = hub.repos["org/tiny-llama"].commit("main", "a newer card", {"README.md": b"# newer"}).sha
        assert head != old
        settings = Settings(home=tmp_path / "home", lease_seconds=30, hf_endpoint=hub.endpoint)
        hashed = []
        real_sha = shards.sha256_file
        monkeypatch.setattr(shards, "sha256_file", lambda p: hashed.append(p.name) or real_sha(p))
        job_id = submit(db, {"model": {"source": "hub", "repo_id": "org/tiny-llama"}, "method": "rtn",
                             "options": {"group_size": 32}, "evaluate": False})
        assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, _, (art,) = load(db, job_id)
    source = job.metrics["source"]
    assert source["revision"] == head
    shards = sorted(p.name for p in tiny_llama.glob("*.safetensors"))
    assert shards and set(shards) <= set(source["files"])
    for name in shards:
        assert source["files"][name] == hashlib.sha256((tiny_llama / name).read_bytes()).hexdigest()
    card = store.get_bytes(f"{stored_prefix(art)}/README.md").decode()
    assert f"- revision: `{head}`" in card and all(source["files"][n] in card for n in shards)
    assert any(f["path"] == "README.md" for f in art.files)
    assert (art.source_revision, art.source_files) == (head, source["files"])  # on the artifact row too
    view = ArtifactOut.model_validate(artifact_view(art)).model_dump(mode="json")  # and in the artifact API's answer
    assert view["source_revision"] == head and view["source_files"] == source["files"]
    assert sorted(hashed) == sorted(source["files"])  # each source file hashed once per job (fingerprint and provenance)
    meta = card_metadata(card)
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert len(meta["tags"]) == len(set(meta["tags"])) and "gptq" in meta["tags"]  # rtn writes gptq: named once
