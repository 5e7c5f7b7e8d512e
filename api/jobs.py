"""Job endpoints: create, get, list, events, cancel, retry, artifacts (over the jobs service)."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, request
from sqlalchemy import select

from api import auth, job_service
from api.context import services
from api.errors import json_body, query_int
from quantfarm.errors import ValidationFailed
from quantfarm.spec import parse_spec
from storage import jobs as job_store
from storage.models import JobEvent
from storage.teams import Role
from storage.views import artifact_view, event_view

bp = Blueprint("jobs", __name__)

_CURSOR = re.compile(r"^job_[0-9a-z]{26}$")
STATUSES = tuple(s.value for s in job_store.JobStatus)


# Set by api/fastpath.py when its submit failed at or after the commit: the view answers that error, never submits again.
SUBMIT_FAILED = "quantfarm.submit_failed"


@bp.post("/v1/jobs")
def create_job():
    failed = request.environ.pop(SUBMIT_FAILED, None)
    if failed is not None:
        raise failed
    view = job_service.submit(parse_spec(json_body()))
    return view, 201, created_headers(view)


def created_headers(view: dict) -> dict[str, str]:
    return {"Location": f"/v1/jobs/{view['id']}"}


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    return job_service.get(job_id)


@bp.get("/v1/jobs")
def list_jobs():
    return jobs_page(services().db, auth.current(), request.args, int(current_app.config["JOBS_PAGE_MAX"]))


def jobs_page(db, who: auth.Principal, args, page_max: int) -> dict:
    """The body of GET /v1/jobs for ``who`` and the query ``args`` (its first values).

    Raises ValidationFailed naming each bad parameter, then Forbidden or a database error.
    """
    status, limit, cursor = page_query(args, page_max)
    items, nxt = job_service.read_page(db, who, status=status, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": nxt}


def page_query(args, page_max: int) -> tuple[str | None, int, str | None]:
    """GET /v1/jobs's ``status``, ``limit`` and ``cursor`` from ``args`` (the view's and api/fastpath.py's).

    Raises ValidationFailed naming each bad parameter.
    """
    status = args.get("status") or None
    cursor = args.get("cursor") or None
    bad = {}
    if status is not None and status not in STATUSES:
        bad["status"] = f"must be one of {', '.join(STATUSES)}"
    if cursor is not None and not _CURSOR.match(cursor):
        bad["cursor"] = "must be a next_cursor value from a previous page"
    try:
        limit = query_int("limit", 50, 1, page_max, args)
    except ValidationFailed as exc:
        bad.update(exc.fields)
    if bad:
        raise ValidationFailed(bad)
    return status, limit, cursor


@bp.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    who = auth.require(Role.VIEWER)
    after = query_int("after", 0, 0, 2**62)
    with services().db.session() as s:
        job_store.get_job(s, job_id, team_id=who.scope)
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id))
        return {"items": [event_view(e) for e in rows]}


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    return job_service.cancel(job_id), 202


@bp.post("/v1/jobs/<job_id>/retry")
def retry_job(job_id: str):
    return job_service.retry(job_id), 202


@bp.get("/v1/jobs/<job_id>/artifacts")
def job_artifacts(job_id: str):
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        job = job_store.get_job(s, job_id, team_id=who.scope)
        return {"items": [artifact_view(a) for a in job.artifacts]}
