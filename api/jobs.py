"""Job endpoints: create, get, list, events, cancel, retry, artifacts."""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from flask import Blueprint, current_app, request
from sqlalchemy import select

from api.app import services
from api.errors import json_body, query_int
from api.uploads import upload_exists
from quantfarm.errors import ValidationFailed
from quantfarm.netguard import check_webhook_urls
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from storage import jobs as job_store
from storage.models import Artifact, JobEvent
from storage.views import artifact_view, event_view, job_view

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)

_CURSOR = re.compile(r"^job_[0-9a-z]{26}$")
STATUSES = tuple(s.value for s in job_store.JobStatus)


def model_ref(model) -> str:
    """Return a readable one-line name for a spec's model source."""
    if model.source == "hub":
        return f"hub:{model.repo_id}@{model.revision}"
    if model.source == "s3":
        return model.uri
    if model.source == "local":
        return f"local:{model.path}"
    return f"upload:{model.upload_id}"


def _check_uploads(spec) -> None:
    store = services().store
    bad = {}
    if spec.calibration.upload_id is not None and not upload_exists(store, spec.calibration.upload_id):
        bad["calibration.upload_id"] = "no upload with this id; upload the file with POST /v1/uploads first"
    if spec.model.source == "upload" and not upload_exists(store, spec.model.upload_id):
        bad["model.upload_id"] = "no upload with this id; upload it with POST /v1/uploads first"
    if bad:
        raise ValidationFailed(bad)


def enqueue(job_id: str) -> bool:
    """Send the job to the workers; if the broker is down, leave it queued for the sweeper."""
    try:
        services().dispatcher.run_job(job_id)
        return True
    except Exception as exc:  # any broker failure: the DB row is the truth, the sweeper re-sends
        log.warning("Could not enqueue job %s (%s); it stays queued and the sweeper will send it again.", job_id, type(exc).__name__)
        try:
            with services().db.session() as s:
                job_store.add_event(s, job_id, "log", message="The queue was unreachable; the job will be sent again automatically.")
        except Exception:
            log.warning("Could not record the enqueue failure of job %s", job_id, exc_info=True)
        return False


def submit(spec, via: str = "api") -> dict:
    """Check what the spec refers to, create the queued job, enqueue it after the commit; return its view.

    Raises ValidationFailed for an unknown upload or a refused webhook URL
    (nothing is stored then).
    """
    svc = services()
    _check_uploads(spec)
    check_webhook_urls([h.url for h in spec.webhooks], svc.settings.webhook_allow_private)
    with svc.db.session() as s:
        job = job_store.create_job(
            s, method=spec.method, model_ref=model_ref(spec.model), spec=public_spec(spec),
            secrets=spec_secrets(spec), priority=spec.priority,
        )
        view = job_view(job, artifacts=[])
    enqueue(job.id)  # only after the commit, so a worker always finds the row
    log.info("Created job %s via %s (%s, %s)", job.id, via, job.method, job.model_ref)
    return view


@bp.post("/v1/jobs")
def create_job():
    view = submit(parse_spec(json_body()))
    return view, 201, {"Location": f"/v1/jobs/{view['id']}"}


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    with services().db.session() as s:
        return job_view(job_store.get_job(s, job_id))


@bp.get("/v1/jobs")
def list_jobs():
    status = request.args.get("status") or None
    cursor = request.args.get("cursor") or None
    bad = {}
    if status is not None and status not in STATUSES:
        bad["status"] = f"must be one of {', '.join(STATUSES)}"
    if cursor is not None and not _CURSOR.match(cursor):
        bad["cursor"] = "must be a next_cursor value from a previous page"
    try:
        limit = query_int("limit", 50, 1, int(current_app.config["JOBS_PAGE_MAX"]))
    except ValidationFailed as exc:
        bad.update(exc.fields)
    if bad:
        raise ValidationFailed(bad)
    with services().db.session() as s:
        rows, nxt = job_store.list_jobs(s, status=status, limit=limit, cursor=cursor)
        arts = _artifacts_by_job(s, [j.id for j in rows])
        items = [job_view(j, artifacts=arts[j.id]) for j in rows]
    return {"items": items, "next_cursor": nxt}


def _artifacts_by_job(s, job_ids: list[str]) -> dict[str, list[Artifact]]:
    # One query for the page instead of one lazy load per job.
    out: dict[str, list[Artifact]] = defaultdict(list)
    if job_ids:
        for a in s.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.created_at)):
            out[a.job_id].append(a)
    return out


@bp.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    after = query_int("after", 0, 0, 2**62)
    with services().db.session() as s:
        job_store.get_job(s, job_id)
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id))
        return {"items": [event_view(e) for e in rows]}


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    with services().db.session() as s:
        job = job_store.request_cancel(s, job_id)
        view = job_view(job)
    log.info("Cancel of job %s: now %s%s", job_id, view["status"], " (cancel requested)" if view["cancel_requested"] else "")
    return view, 202


@bp.post("/v1/jobs/<job_id>/retry")
def retry_job(job_id: str):
    with services().db.session() as s:
        job = job_store.retry(s, job_id, retry_window_days=services().settings.retry_window)
        view = job_view(job)
    enqueue(job_id)
    log.info("Retry of job %s: attempt %s", job_id, view["attempt"])
    return view, 202


@bp.get("/v1/jobs/<job_id>/artifacts")
def job_artifacts(job_id: str):
    with services().db.session() as s:
        job = job_store.get_job(s, job_id)
        return {"items": [artifact_view(a) for a in job.artifacts]}
