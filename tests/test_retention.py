"""Retention on a real database and a real local store: the retry window and `quantfarm gc`."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from quantfarm.errors import InvalidState
from quantfarm.settings import Settings
from storage import jobs, layout
from storage.artifacts import LocalStore
from storage.jobs import JobStatus, Lease
from storage.models import Artifact, Job, JobEvent, WebhookDelivery, new_id, utcnow
from storage.retention import GcAges, collect, erase_run_secrets
from storage.webhooks import replay

SECRETS = {"model.token": "hf_model", "destination.hub.token": "hf_dest", "webhooks.0.secret": "whsec_x"}


@pytest.fixture
def farm(db, tmp_path):
    settings = Settings(home=tmp_path / "home", retry_window=7)
    return settings, db, LocalStore(tmp_path / "store")


def make_job(db, status, *, days_ago=0.0, spec=None, claim=1, secrets=None) -> str:
    with db.session() as s:
        job = jobs.create_job(s, method="rtn", model_ref="m", spec=spec or {}, secrets=dict(secrets or SECRETS))
        ended = utcnow() - timedelta(days=days_ago)
        s.execute(update(Job).where(Job.id == job.id).values(
            status=status, claim=claim, finished_at=ended if status in ("succeeded", "failed", "cancelled") else None,
            lease_owner="w" if status == "running" else None))
        return job.id


def put_files(store, prefix, n=2) -> set[str]:
    keys = {f"{prefix}/f{i}.bin" for i in range(n)}
    for k in keys:
        store.put_bytes(k, b"x" * 10)
    return keys


def put_upload(store, upload_id, days_ago) -> set[str]:
    created = (utcnow() - timedelta(days=days_ago)).isoformat().replace("+00:00", "Z")
    store.put_bytes(f"uploads/{upload_id}/calib.txt", b"text")
    store.put_bytes(layout.upload_meta_key(upload_id), json.dumps({"id": upload_id, "created_at": created}).encode())
    return {f"uploads/{upload_id}/calib.txt", layout.upload_meta_key(upload_id)}


def add_artifact(db, job_id, prefix, days_ago=10) -> str:
    with db.session() as s:
        art = Artifact(id=new_id("art"), job_id=job_id, kind="model", format="gptq", files=[], sha256="0" * 64,
                       store_prefix=prefix, created_at=utcnow() - timedelta(days=days_ago))
        s.add(art)
        return art.id


def add_event(db, job_id, kind, days_ago) -> int:
    with db.session() as s:
        ev = jobs.add_event(s, job_id, kind, message=kind)
        s.flush()
        ev.at = utcnow() - timedelta(days=days_ago)
        return ev.id


def add_delivery(db, job_id, status, days_ago, index) -> str:
    with db.session() as s:
        d = WebhookDelivery(id=new_id("whd"), job_id=job_id, hook_index=index, url="http://hook", event_type="job.failed",
                            payload="{}", status=status, created_at=utcnow() - timedelta(days=days_ago))
        s.add(d)
        return d.id


def up(name) -> str:
    return "upl_" + name.ljust(26, "0")


def test_gc_removes_exactly_what_it_should_and_nothing_else(farm):
    settings, db, store = farm
    old_failed = make_job(db, "failed", days_ago=10, spec={"calibration": {"upload_id": up("a")}})
    new_failed = make_job(db, "failed", days_ago=1, spec={"calibration": {"upload_id": up("b")}})
    old_done = make_job(db, "succeeded", days_ago=10, claim=2)
    queued = make_job(db, "queued", spec={"model": {"upload_id": up("c")}, "gate": {"task_set_upload_id": up("f")}})
    running = make_job(db, "running")
    keep, gone = set(), set()
    gone |= put_files(store, layout.checkpoint_prefix(old_failed))
    keep |= put_files(store, layout.checkpoint_prefix(new_failed))
    keep |= put_files(store, layout.artifact_prefix(old_done, 2))
    gone |= put_files(store, layout.artifact_prefix(old_done, 1))  # a zombie claim's leftovers
    add_artifact(db, old_done, layout.artifact_prefix(old_done, 2))
    gone |= put_upload(store, up("a"), 30)  # only its purged job used it
    keep |= put_upload(store, up("b"), 30)  # a retryable job may need it
    keep |= put_upload(store, up("c"), 30)  # a queued job needs it
    gone |= put_upload(store, up("d"), 30)  # nobody
    keep |= put_upload(store, up("e"), 1)  # too young
    keep |= put_upload(store, up("f"), 30)  # a queued job's gate task set
    scratch = settings.resolved_scratch_dir
    for name in (old_failed, running, new_failed):
        (scratch / name / "abc").mkdir(parents=True)
        (scratch / name / "abc" / "w.bin").write_bytes(b"w")
    stale = time.time() - 3 * 24 * 3600
    for name in (old_failed, running):
        for p in (scratch / name, scratch / name / "abc", scratch / name / "abc" / "w.bin"):
            os.utime(p, (stale, stale))
    old_progress = add_event(db, old_done, "progress", 100)
    old_status = add_event(db, old_done, "status", 100)
    running_progress = add_event(db, running, "progress", 100)
    young_progress = add_event(db, old_done, "progress", 1)
    d_old = add_delivery(db, old_done, "delivered", 40, 0)
    d_pending = add_delivery(db, old_done, "pending", 40, 1)
    d_young = add_delivery(db, old_done, "delivered", 1, 2)

    report = collect(db, store, settings, GcAges.from_settings(settings))

    assert sorted(report.purged_jobs) == sorted([old_failed, old_done])
    assert sorted(report.uploads) == [up("a"), up("d")]
    assert report.scratch == [old_failed]
    assert report.stale_claims == [layout.artifact_prefix(old_done, 1)]
    assert report.artifacts == [] and report.events == 1 and report.deliveries == 1
    assert set(store.list("")) == keep  # and nothing else went
    assert sorted(p.name for p in scratch.iterdir()) == sorted([running, new_failed])
    with db.session() as s:
        rows = {j.id: j for j in s.scalars(select(Job))}
        events = set(s.scalars(select(JobEvent.id)))
        deliveries = set(s.scalars(select(WebhookDelivery.id)))
        assert len(s.scalars(select(Artifact)).all()) == 1
    assert rows[old_failed].secrets == {} and rows[old_failed].purged_at is not None
    assert rows[old_done].secrets == {}  # webhook signing secrets go when the window ends
    assert rows[new_failed].secrets == SECRETS and rows[new_failed].purged_at is None
    assert rows[queued].secrets == SECRETS and rows[running].secrets == SECRETS
    assert {old_status, running_progress, young_progress} <= events and old_progress not in events
    assert deliveries == {d_pending, d_young} and d_old not in deliveries

    again = collect(db, store, settings, GcAges.from_settings(settings))
    assert again.as_dict() == {"purged_jobs": [], "uploads": [], "scratch": [], "stale_claims": [], "artifacts": [],
                               "events": 0, "deliveries": 0, "workers": 0}

    asked = collect(db, store, settings, GcAges.from_settings(settings, artifacts_days=5))
    assert len(asked.artifacts) == 1 and store.list(layout.artifact_prefix(old_done, 2)) == []


def test_retry_inside_the_window_keeps_everything_and_after_gc_is_refused(farm):
    settings, db, store = farm
    inside = make_job(db, "failed", days_ago=6)
    outside = make_job(db, "cancelled", days_ago=8)
    kept = put_files(store, layout.checkpoint_prefix(inside))
    with db.session() as s:
        job = jobs.retry(s, inside, retry_window_days=settings.retry_window)
        assert (job.status, job.attempt, job.secrets) == ("queued", 2, SECRETS)
    assert set(store.list(layout.checkpoint_prefix(inside))) == kept
    with pytest.raises(InvalidState, match="outside the retry window") as exc:  # refused even before gc ran
        with db.session() as s:
            jobs.retry(s, outside, retry_window_days=settings.retry_window)
    assert exc.value.code == "retry_window_passed" and exc.value.http_status == 409
    with db.session() as s:
        old_delivery = WebhookDelivery(id=new_id("whd"), job_id=outside, hook_index=0, url="https://h/***", event_type="job.cancelled",
                                       payload="{}", status="delivered", created_at=utcnow())
        s.add(old_delivery)
    collect(db, store, settings, GcAges.from_settings(settings))
    with pytest.raises(InvalidState, match="can no longer be replayed") as exc:  # it would go unsigned, to a masked URL
        with db.session() as s:
            replay(s, old_delivery.id)
    assert exc.value.code == "retry_window_passed"
    with pytest.raises(InvalidState, match="checkpoints and secrets are gone"):  # after gc: refused with no window given
        with db.session() as s:
            jobs.retry(s, outside)
    with db.session() as s:
        assert jobs.get_job(s, outside).status == "cancelled"


def test_success_erases_model_and_destination_tokens_but_keeps_webhook_secrets(db):
    job_id = make_job(db, "queued")
    with db.session() as s:
        job = jobs.claim(s, job_id, "w1", 60)
        jobs.transition(s, job, JobStatus.SUCCEEDED, lease=Lease("w1", job.claim))
        erase_run_secrets(s, job_id)
    with db.session() as s:
        assert jobs.get_job(s, job_id).secrets == {"webhooks.0.secret": "whsec_x"}


def test_quantfarm_gc_runs_the_collection_and_reports_it(tmp_path, monkeypatch, capsys):
    """The CLI command against an embedded home: an expired failed job's checkpoints go, a young one's stay."""
    from quantfarm.cli import main
    from quantfarm.secrets import keyring_from_settings
    from storage.db import Database
    from storage.migrate import upgrade

    home = tmp_path / "home"
    monkeypatch.setenv("QUANTFARM_HOME", str(home))
    for var in ("QUANTFARM_DATABASE_URL", "QUANTFARM_BROKER_URL", "QUANTFARM_STORE", "QUANTFARM_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings()
    upgrade(settings.resolved_database_url)
    db = Database(settings.resolved_database_url, keyring=keyring_from_settings(settings))
    store = LocalStore(settings.resolved_artifact_dir)
    old, young = make_job(db, "failed", days_ago=30), make_job(db, "failed", days_ago=1)
    put_files(store, layout.checkpoint_prefix(old))
    kept = put_files(store, layout.checkpoint_prefix(young))
    db.dispose()
    assert main(["gc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["purged_jobs"] == [old] and out["artifacts"] == []
    assert set(store.list("jobs/")) == kept
