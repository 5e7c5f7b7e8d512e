"""The web pages: the submit form, the jobs list and the live job page.

Pages are rendered on the server from the same spec schema and job views the
JSON API uses; small scripts under ``static/`` poll the JSON API for live
updates. Register with ``app.register_blueprint(web.bp)``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, abort, redirect, jsonify, render_template, request, url_for
from sqlalchemy import select

from api import auth, job_service
from api.web_form import (
    CALIB_KINDS, SECRET_FIELDS, SOURCES, form_text, calibration_limits, default_values, field_errors, form_to_body, format_fields,
    option_fields, submitted_values,
)
from api.context import services
from quantfarm.errors import Forbidden, InvalidState, NotFound, Unauthorized, ValidationFailed
from quantfarm import registry
from quantfarm.loading import artifact_loads
from quantfarm.spec import BUILTIN_DATASETS, method_names, parse_spec
from storage import jobs as job_store
from storage.models import Artifact, JobEvent
from storage.teams import Role
from storage.views import event_view, job_view

log = logging.getLogger(__name__)
bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/assets")

STATUSES = tuple(s.value for s in job_store.JobStatus)
PAGE_SIZE = 25
_CURSOR = re.compile(r"^job_[0-9a-z]{26}$")


# --- creating the job -------------------------------------------------------------------


def create_from_spec(spec) -> str:
    """Create the job exactly as POST /v1/jobs does; return its id."""
    return job_service.submit(spec, via="web form")["id"]


# --- pages -----------------------------------------------------------------------------


def _render_form(values: dict[str, Any], errors: dict[str, str] | None = None, cleared: list[str] | None = None, status: int = 200):
    return render_template(
        "web/form.html", values=values, errors=errors or {}, cleared=cleared or [], methods=method_names(),
        option_fields={m: option_fields(m) for m in method_names()},
        format_fields={m: format_fields(m) for m in method_names()}, method_help={e.name: e.summary for e in registry.methods()}, sources=SOURCES, calib_kinds=CALIB_KINDS,
        builtins=[f"builtin:{b}" for b in BUILTIN_DATASETS], limits=calibration_limits(),
    ), status


@bp.get("/")
def form_page():
    return _render_form(default_values())


@bp.post("/")
def submit_form():
    form = request.form
    try:
        job_id = create_from_spec(parse_spec(form_to_body(form)))
    except ValidationFailed as exc:  # schema errors, and refused webhook URLs or uploads at submit
        values = submitted_values(form)
        cleared = [k for k in SECRET_FIELDS if form_text(form, k)]
        for k in SECRET_FIELDS:
            values[k] = ""  # never echo a secret back into a page
        return _render_form(values, field_errors(exc.fields, form), cleared, status=422)
    return redirect(url_for("web.job_page", job_id=job_id), code=303)


def _duration(job: dict[str, Any]) -> float | None:
    if not job.get("started_at"):
        return None
    start = _parse(job["started_at"])
    end = _parse(job["finished_at"]) if job.get("finished_at") else datetime.now(timezone.utc)
    return max((end - start).total_seconds(), 0.0)


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


@bp.get("/jobs")
def jobs_page():
    status = request.args.get("status") or None
    cursor = request.args.get("cursor") or None
    if status is not None and status not in STATUSES:
        status = None
    if cursor is not None and not _CURSOR.match(cursor):
        cursor = None
    limit = min(max(request.args.get("limit", PAGE_SIZE, type=int), 1), 100)
    items, nxt = job_service.page(status=status, limit=limit, cursor=cursor, with_artifacts=False)
    for item in items:
        item["duration"] = _duration(item)
    return render_template(
        "web/jobs.html", items=items, status=status, statuses=STATUSES, next_cursor=nxt, cursor=cursor,
        limit=None if limit == PAGE_SIZE else limit,
    )


def _artifact_files(arts: list[Artifact]) -> dict[str, list[dict[str, Any]]]:
    return {a.id: [{"path": f.get("path"), "size": f.get("size"), "sha256": f.get("sha256")} for f in (a.files or [])] for a in arts}


def timeline(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge each run of consecutive progress events into its latest one (one line per run)."""
    out: list[dict[str, Any]] = []
    for e in events:
        if e["kind"] == "progress" and out and out[-1]["kind"] == "progress":
            e = {**e, "merged": out[-1].get("merged", 1) + 1, "since": out[-1].get("since", out[-1]["at"])}
            out[-1] = e
        else:
            out.append(e)
    return out


@bp.get("/jobs/<job_id>")
def job_page(job_id: str):
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        try:
            job = job_store.get_job(s, job_id, team_id=who.scope)
        except NotFound:
            return render_template("web/404.html", job_id=job_id), 404
        view = job_view(job)
        files = _artifact_files(job.artifacts)
        events = [event_view(e) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]
    view["duration"] = _duration(view)
    return render_template(
        "web/job.html", job=view, events=events, timeline=timeline(events), files=files, loads=artifact_loads(view),
        spec_json=json.dumps(spec_for_display(view["spec"]), indent=2),
        page_data={"job": {k: v for k, v in view.items() if k != "spec"}, "events": events, "files": files},
    )


@bp.get("/jobs/<job_id>/loads")
def job_loads(job_id: str):
    """How to load each of the job's artifacts, for the live page to show when the job finishes while it is open."""
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        try:
            view = job_view(job_store.get_job(s, job_id, team_id=who.scope))
        except NotFound:
            return jsonify({"error": "not_found", "message": f"No job {job_id}."}), 404
    return jsonify(artifact_loads(view))


def spec_for_display(spec: dict[str, Any], limit: int = 2000) -> dict[str, Any]:
    """Return the spec with long text lists summarized (calibration texts can be megabytes)."""
    out = copy.deepcopy(spec)
    for section in ("calibration", "evaluation"):
        texts = (out.get(section) or {}).get("texts")
        if texts and sum(map(len, texts)) > limit:
            out[section]["texts"] = f"<{len(texts)} texts, {sum(map(len, texts))} characters>"
    return out


@bp.post("/jobs/<job_id>/<action>")
def job_action(job_id: str, action: str):
    """No-script fallback of the Cancel and Retry buttons (the script calls the JSON API)."""
    endpoint = {"cancel": job_service.cancel, "retry": job_service.retry}.get(action)
    if endpoint is None:
        abort(404)
    try:
        endpoint(job_id)  # the same service the JSON API calls: same checks, transitions and enqueueing
    except NotFound:
        return render_template("web/404.html", job_id=job_id), 404
    except (InvalidState, Forbidden) as exc:
        log.info("Web %s of job %s refused: %s", action, job_id, exc.message)
    return redirect(url_for("web.job_page", job_id=job_id), code=303)


# --- sign-in ----------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    # Only a path on this site: never an absolute URL a crafted link could bounce the user to.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("web.jobs_page")


@bp.get("/farm")
def farm_page():
    from api.farm import farm_state

    state = farm_state()
    return render_template("web/farm.html", farm=state, workers=state.get("items"))


@bp.get("/signin")
def signin_page():
    return render_template("web/signin.html", next=_safe_next(request.args.get("next")), error=None)


@bp.post("/signin")
def signin():
    key = (request.form.get("key") or "").strip()
    target = _safe_next(request.form.get("next"))
    try:
        auth.sign_in(key)
    except Unauthorized as exc:
        return render_template("web/signin.html", next=target, error=exc.message), 401
    return redirect(target, code=303)


@bp.post("/signout")
def signout():
    auth.sign_out()
    return redirect(url_for("web.signin_page"), code=303)


@bp.app_context_processor
def _who():
    from flask import g

    p = g.get("principal")
    signed_in = p is not None and p.key_id is not None
    team = None
    if signed_in:
        from storage.models import Team

        with services().db.session() as s:
            row = s.get(Team, p.team_id)
            team = row.name if row else p.team_id
    return {"principal": p, "signed_in": signed_in, "team_name": team}


# --- template helpers ----------------------------------------------------------------


@bp.app_template_filter("filesize")
def filesize(n: int | float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@bp.app_template_filter("seconds")
def seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


@bp.app_template_filter("when")
def when(ts: str | None) -> str:
    return "–" if not ts else _parse(ts).strftime("%Y-%m-%d %H:%M:%S UTC")
