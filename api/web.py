"""The web pages: the submit form, the jobs list and the live job page.

Pages are rendered on the server from the same spec schema and job views the
JSON API uses; small scripts under ``static/`` poll the JSON API for live
updates. Register with ``app.register_blueprint(web.bp)``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for
from sqlalchemy import select
from werkzeug.datastructures import MultiDict

from api import auth, job_service
from api.context import services
from quantfarm.errors import Forbidden, InvalidState, NotFound, Unauthorized, ValidationFailed
from quantfarm import registry
from quantfarm.loading import artifact_loads
from quantfarm.spec import (
    BUILTIN_DATASETS, Calibration, Destination, HubDestination, HubSource, JobBase, method_names, method_options, parse_spec,
)
from storage import jobs as job_store
from storage.models import Artifact, JobEvent
from storage.teams import Role
from storage.views import event_view, job_view

log = logging.getLogger(__name__)
bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/assets")

STATUSES = tuple(s.value for s in job_store.JobStatus)
PAGE_SIZE = 25
SOURCES = (("hub", "Hugging Face Hub"), ("s3", "S3 URI"), ("local", "Local path"))
CALIB_KINDS = (("builtin", "Built-in set"), ("texts", "My own texts"), ("hub", "Hub dataset"))
SECRET_FIELDS = ("model.token", "destination.hub.token", "webhooks.0.secret")
_FIXED_CHECKBOXES = ("evaluate", "destination.store", "destination.hub.private")
_CURSOR = re.compile(r"^job_[0-9a-z]{26}$")
_UNSET = object()


# --- the form's fields, from the spec's JSON schema ----------------------------------


def option_fields(method: str) -> list[dict[str, Any]]:
    """Describe one method's option inputs from the schema the API validates with (read-only)."""
    return _option_fields(method, registry.generation())


@functools.lru_cache(maxsize=256)
def _option_fields(method: str, _generation: int) -> list[dict[str, Any]]:
    schema = method_options()[method].model_json_schema()
    fields = []
    for name, prop in schema["properties"].items():
        choices = prop.get("enum") or ([prop["const"]] if "const" in prop else None)
        kind = "select" if choices else {"boolean": "checkbox", "integer": "number", "number": "number", "array": "list"}.get(prop.get("type"), "text")
        default = prop.get("default", [] if kind == "list" else None)
        fields.append({
            "name": name,
            "input": f"options.{method}.{name}",
            "id": f"f-options-{method}-{name}".replace("_", "-"),
            "label": prop.get("title", name),
            "help": prop.get("description", ""),
            "kind": kind,
            "choices": choices,
            "default": default,
            "min": prop.get("minimum"),
            "max": prop.get("maximum"),
            "step": "any" if prop.get("type") == "number" else "1",
        })
    return fields


def format_fields(method: str) -> list[dict[str, Any]]:
    """One checkbox per format the method can write (each becomes one artifact)."""
    entry = registry.method_entry(method)
    return [{
        "name": f, "input": f"formats.{method}.{f}", "id": f"f-formats-{method}-{f}",
        "help": "The method's own format" if i == 0 else f"Also write {f} from the same quantization",
    } for i, f in enumerate(entry.formats if entry else ())]


def calibration_limits() -> dict[str, dict[str, Any]]:
    props = Calibration.model_json_schema()["properties"]
    return {k: {"default": props[k]["default"], "min": props[k].get("minimum"), "max": props[k].get("maximum")} for k in ("num_samples", "seq_len")}


def default_values() -> dict[str, Any]:
    """Return the form's initial values: the spec's defaults."""
    limits = calibration_limits()
    job = JobBase.model_fields
    values: dict[str, Any] = {
        "model.source": "hub", "model.revision": HubSource.model_fields["revision"].default, "method": method_names()[0],
        "calibration.kind": "builtin", "calibration.builtin": f"builtin:{BUILTIN_DATASETS[0]}",
        "calibration.num_samples": str(limits["num_samples"]["default"]),
        "calibration.seq_len": str(limits["seq_len"]["default"]),
        "evaluate": job["evaluate"].default, "priority": str(job["priority"].default),
        "destination.store": Destination.model_fields["store"].default,
        "destination.hub.private": HubDestination.model_fields["private"].default,
    }
    for m in method_names():
        for i, f in enumerate(format_fields(m)):
            values[f["input"]] = i == 0
        for f in option_fields(m):
            d = f["default"]
            values[f["input"]] = d if f["kind"] == "checkbox" else (", ".join(d) if isinstance(d, list) else str(d))
    return values


def submitted_values(form: MultiDict) -> dict[str, Any]:
    """Return what the user typed, with checkboxes as booleans (for re-rendering)."""
    values: dict[str, Any] = {k: v for k, v in form.items()}
    boxes = list(_FIXED_CHECKBOXES) + [f["input"] for m in method_names() for f in option_fields(m) if f["kind"] == "checkbox"]
    boxes += [f["input"] for m in method_names() for f in format_fields(m)]
    for name in boxes:
        values[name] = name in form
    return values


# --- form -> API body -------------------------------------------------------------------


def _text(form: MultiDict, name: str) -> str:
    return (form.get(name) or "").strip()


def _number(raw: str) -> Any:
    # Unparseable input goes to the validator as typed, so the user sees its message.
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def _option_value(field: dict, form: MultiDict) -> Any:
    raw = _text(form, field["input"])
    if field["kind"] in ("number", "text", "select") and raw == "":
        return _UNSET  # an emptied box (or a select the form did not send) means "use the default"
    if field["kind"] == "checkbox":
        return field["input"] in form
    if field["kind"] == "select":
        return next((c for c in field["choices"] if str(c) == raw), raw)
    if field["kind"] == "list":
        return [p.strip() for p in raw.split(",") if p.strip()]
    return _number(raw) if field["kind"] == "number" else raw


def _model(form: MultiDict) -> dict[str, Any]:
    source = _text(form, "model.source")
    keys = {"hub": ("repo_id", "revision", "token"), "s3": ("uri",), "local": ("path",)}.get(source, ())
    model: dict[str, Any] = {"source": source}
    for key in keys:
        if _text(form, f"model.{key}"):
            model[key] = _text(form, f"model.{key}")
    return model


def _calibration(form: MultiDict) -> dict[str, Any]:
    calib: dict[str, Any] = {}
    kind = _text(form, "calibration.kind")
    if kind == "builtin":
        calib["dataset"] = _text(form, "calibration.builtin")
    elif kind == "hub":
        name = _text(form, "calibration.hub")
        calib["dataset"] = name if name.startswith("hub:") else f"hub:{name}"
    elif kind == "texts":
        raw = (form.get("calibration.texts") or "").replace("\r\n", "\n")
        calib["texts"] = [b.strip() for b in re.split(r"\n[ \t]*\n", raw) if b.strip()]
    for key in ("num_samples", "seq_len"):
        if _text(form, f"calibration.{key}"):
            calib[key] = _number(_text(form, f"calibration.{key}"))
    return calib


def form_to_body(form: MultiDict) -> dict[str, Any]:
    """Turn the submitted form into the JSON body POST /v1/jobs takes."""
    method = _text(form, "method")
    body: dict[str, Any] = {"model": _model(form), "method": method, "calibration": _calibration(form)}
    if method in method_names():
        values = {f["name"]: _option_value(f, form) for f in option_fields(method)}
        body["options"] = {k: v for k, v in values.items() if v is not _UNSET}
        formats = [f["name"] for f in format_fields(method) if f["input"] in form]
        if formats:
            body["formats"] = formats
    body["evaluate"] = "evaluate" in form
    dest: dict[str, Any] = {"store": "destination.store" in form}
    if _text(form, "destination.hub.repo_id"):
        hub = {"repo_id": _text(form, "destination.hub.repo_id"), "private": "destination.hub.private" in form}
        for key in ("branch", "token"):
            if _text(form, f"destination.hub.{key}"):
                hub[key] = _text(form, f"destination.hub.{key}")
        dest["hub"] = hub
    body["destination"] = dest
    if _text(form, "webhooks.0.url"):
        hook = {"url": _text(form, "webhooks.0.url")}
        if _text(form, "webhooks.0.secret"):
            hook["secret"] = _text(form, "webhooks.0.secret")
        body["webhooks"] = [hook]
    if _text(form, "priority"):
        body["priority"] = _number(_text(form, "priority"))
    return body


def field_errors(fields: dict[str, str], form: MultiDict) -> dict[str, str]:
    """Map the API's ``details.fields`` keys onto the form's input names."""
    method = _text(form, "method")
    kind = _text(form, "calibration.kind")
    known = set(default_values()) | {"model.repo_id", "model.token", "model.uri", "model.path", "calibration.texts",
                                     "calibration.hub", "destination.hub.repo_id", "destination.hub.branch",
                                     "destination.hub.token", "webhooks.0.url", "webhooks.0.secret", "calibration", "destination",
                                     "model", "webhooks"}
    out: dict[str, str] = {}
    for key, msg in fields.items():
        name = key
        if key.startswith("options.") and method in method_names():
            name = f"options.{method}.{key.split('.')[1]}"
        elif key.startswith("formats") and format_fields(method):
            name = format_fields(method)[0]["input"]
        elif key == "calibration.dataset":
            name = "calibration.hub" if kind == "hub" else "calibration.builtin"
        elif key.startswith("calibration.texts"):
            name = "calibration.texts"
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        name = name if name in known else "form"
        out[name] = f"{out[name]}; {msg}" if name in out else msg
    return out


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
        cleared = [k for k in SECRET_FIELDS if _text(form, k)]
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
