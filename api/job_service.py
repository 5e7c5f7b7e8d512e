"""The jobs application service: submit, enqueue, cancel, retry, read; REST and pages both call it.

Submit checks, in this order for everyone who adds to it: body and schema (the
caller parsed the spec: 400/422) → auth (401/403) → quota (429) → admission (422)
→ create → wake the workers after the commit (on PostgreSQL the insert's own notice
does: storage/notices.py; elsewhere a broker message).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select

from api import auth
from api.context import services
from api.uploads import read_meta, upload_exists
from quantfarm import taskset
from quantfarm.errors import QuantfarmError, ValidationFailed
from quantfarm.logs import job_context
from quantfarm.memory import estimate_at_submit
from quantfarm.netguard import check_webhook_urls
from quantfarm.spec import public_spec, spec_secrets
from storage import farm
from storage import job_reads
from storage import jobs as job_store
from storage import teams as team_store
from storage.layout import upload_prefix
from storage.lean import Fixed
from storage.models import Job
from storage.notices import announces_new_jobs
from storage.peek import estimate_remote
from storage.sources import check_local_path
from storage.teams import Role
from storage.views import job_view

log = logging.getLogger(__name__)

QUOTA_RETRY_AFTER = 30  # seconds a client over its queued-job quota is told to wait


class QuotaExceeded(QuantfarmError):
    code = "quota_exceeded"
    http_status = 429


def model_ref(model) -> str:
    """Return a readable one-line name for a spec's model source."""
    if model.source == "hub":
        return f"hub:{model.repo_id}@{model.revision}"
    if model.source == "s3":
        return model.uri
    if model.source == "local":
        return f"local:{model.path}"
    return f"upload:{model.upload_id}"


def _credential_refs(spec) -> dict[str, tuple[str, str]]:
    """Return {field: (credential name, kind it must be)} for every credentials_ref in the spec."""
    refs = {}
    if getattr(spec.model, "credentials_ref", None):
        refs["model.credentials_ref"] = (spec.model.credentials_ref, "s3" if spec.model.source == "s3" else "hub")
    if spec.destination.hub is not None and spec.destination.hub.credentials_ref:
        refs["destination.hub.credentials_ref"] = (spec.destination.hub.credentials_ref, "hub")
    if spec.calibration.credentials_ref:
        refs["calibration.credentials_ref"] = (spec.calibration.credentials_ref, "hub")
    return refs


def check_references(s, spec, team_id: str) -> None:
    """Raise ValidationFailed for uploads, credentials or local paths the team may not use."""
    store = services().store
    bad = {}
    if spec.calibration.upload_id is not None and not upload_exists(store, spec.calibration.upload_id, team_id):
        bad["calibration.upload_id"] = "no upload with this id; upload the file with POST /v1/uploads first"
    if spec.model.source == "upload" and not upload_exists(store, spec.model.upload_id, team_id):
        bad["model.upload_id"] = "no upload with this id; upload it with POST /v1/uploads first"
    if spec.gate is not None and spec.gate.task_set_upload_id is not None:
        bad.update(_task_set_problems(store, spec.gate.task_set_upload_id, team_id))
    if spec.model.source == "local":
        try:
            check_local_path(spec.model.path, services().settings.local_roots)
        except ValidationFailed as exc:
            bad.update(exc.fields)
    for field, (name, kind) in _credential_refs(spec).items():
        try:
            cred = team_store.get_credential(s, team_id, name)
        except QuantfarmError:
            bad[field] = f"your team has no credential named {name!r}; add it with POST /v1/credentials"
            continue
        if cred.kind != kind:
            bad[field] = f"credential {name!r} is a {cred.kind} credential; this needs a {kind} one"
    if bad:
        raise ValidationFailed(bad)


def _task_set_problems(store, upload_id: str, team_id: str) -> dict[str, str]:
    """Read the gate's task set now (size first), so a bad file is a 422 at submit, not a failed job."""
    meta = read_meta(store, upload_id, team_id)
    if meta is None:  # unknown, unfinished or another team's: one answer
        return {taskset.FIELD: "no upload with this id; upload the task set with POST /v1/uploads first"}
    try:
        taskset.check_size(int(meta.get("size_bytes") or 0))
        key = f"{upload_prefix(upload_id)}/{meta['filename']}"
        taskset.parse_task_set(store.get_bytes(key).decode("utf-8"))
    except ValidationFailed as exc:
        return exc.fields
    except (KeyError, UnicodeDecodeError):
        return {taskset.FIELD: "the upload cannot be read as a UTF-8 task set; upload it again"}
    return {}


# The jobs themselves, counted up to the limit (a 429 counts them all, for its details).
_QUEUED = select(Job.team_id).where(Job.team_id == bindparam("team_id"), Job.status == job_store.JobStatus.QUEUED.value)
_QUEUED_UP_TO = Fixed(select(func.count()).select_from(_QUEUED.limit(bindparam("limit")).subquery()))
_QUEUED_COUNT = Fixed(select(func.count()).select_from(_QUEUED.subquery()))


def check_quota(s, team_id: str) -> None:
    """Raise QuotaExceeded (429) when the team already has its limit of queued jobs.

    The counted number decides a pass; a 429 is decided and detailed by the jobs
    themselves, as before the count was kept, so a miscount never refuses a submit.
    """
    conn = s.connection()
    # The team's limit and its queued jobs as counted where jobs move (storage.models.TeamQueued), in one statement:
    # a sum over a few rows, where counting the queued jobs read each one (PostgreSQL: 1.5-2.5 ms at 8,000).
    limit, counted = job_store.queued_quota(conn, team_id, services().settings.team_max_queued)
    if counted < limit:
        return
    [(queued,)] = _QUEUED_UP_TO.rows(conn, {"team_id": team_id, "limit": limit})
    if queued < limit:
        log.warning("Team %s: %s queued jobs counted, %s in the jobs table; the submit passes", team_id, counted, queued)
        return
    [(queued,)] = _QUEUED_COUNT.rows(conn, {"team_id": team_id})
    raise QuotaExceeded(
        f"Your team has {queued} queued jobs, its limit; wait for some to start or cancel some.",
        details={"queued": queued, "limit": limit, "retry_after": QUOTA_RETRY_AFTER},
    )


def enqueue(job_id: str, attempt: int = 1) -> bool:
    """Wake the workers; if the broker is down, the job stays queued and an idle worker polls for it."""
    try:
        services().dispatcher.run_job(job_id)
        return True
    except Exception as exc:  # any broker failure: the DB row is the truth; idle workers poll for it
        with job_context(job_id, attempt):
            log.warning("Could not enqueue job %s (%s); it stays queued and an idle worker finds it by polling.", job_id, type(exc).__name__)
            try:
                with services().db.session() as s:
                    job_store.add_event(s, job_id, "log", message="The queue was unreachable; the job will be started automatically.")
            except Exception:
                log.warning("Could not record the enqueue failure of job %s", job_id, exc_info=True)
        return False


@dataclass(frozen=True)
class Checked:
    """A submit that passed every check (``check_submit``); nothing of it is stored yet."""

    spec: Any
    public: dict
    who: auth.Principal
    estimate: int | None


def submit(spec, via: str = "api") -> dict:
    """Create the queued job for the caller's team and enqueue it after the commit; return its view.

    Raises Unauthorized/Forbidden, QuotaExceeded, or ValidationFailed for an unknown upload or
    credential, a path outside the local roots or a refused webhook URL (nothing is stored then).
    """
    return create(check_submit(spec), via)


def check_submit(spec, *, quota: bool = True) -> Checked:
    """Every check of ``submit`` before the job is stored, in its order; raise as ``submit`` does.

    Stores nothing (but the default team, the first time the local admin submits),
    so api/fastpath.py leaves any failure here to Flask, which checks again and answers.
    ``quota=False`` leaves the quota out, for ``create(..., within_quota=True)`` to check
    as it stores (the fast path's submit: one round trip on PostgreSQL).
    """
    svc = services()
    who = auth.require(Role.MEMBER)
    team_id = who.team_id
    public = public_spec(spec)
    # A Hub or S3 model's config.json, read now (bounded, the job's own credentials, outside the transaction).
    remote_estimate = estimate_remote(svc.db, spec, public, team_id, svc.settings)
    if who.key_id is None:
        with svc.db.session() as s:
            team_store.ensure_default_team(s)
    # Reads only (autocommit on PostgreSQL: no BEGIN/COMMIT). The quota's count is no more exact than in a
    # transaction: READ COMMITTED reads every statement anew, and nothing was locked. The session is made at its
    # first use and takes a connection only for a statement: a local model's submit without the quota's check,
    # credentials or an estimate needs neither.
    with svc.db.read_when_needed() as s:
        if quota:
            check_quota(s, team_id)
        check_references(s, spec, team_id)
        check_webhook_urls([h.url for h in spec.webhooks], svc.settings.webhook_allow_private)
        estimate = estimate_at_submit(public) or remote_estimate
        farm.admit(s, estimate, svc.settings.worker_ttl_seconds)  # 422 too_large when no live worker fits
    return Checked(spec, public, who, estimate)


def create(checked: Checked, via: str = "api", *, within_quota: bool = False) -> dict | None:
    """Store the checked job and its event (one transaction: one round trip on PostgreSQL), wake the workers; return
    its view.

    ``within_quota``: store it only while its team is under its quota, read in the
    same statement; None when over it (nothing stored, nothing enqueued). On
    PostgreSQL the insert announces the job itself (storage/notices.py): no
    broker message.
    """
    svc = services()
    job = job_store.insert_job(svc.db, **job_fields(checked), quota=svc.settings.team_max_queued if within_quota else None)
    if job is None:
        return None
    if not announces_new_jobs(svc.db):
        enqueue(job["id"])  # only after the commit, so a worker always finds the row
    return created(job, checked, via)


def job_fields(checked: Checked) -> dict[str, Any]:
    """The checked job's fields for ``storage.jobs.insert_job`` (``new_job_values``)."""
    spec, who = checked.spec, checked.who
    return {"method": spec.method, "model_ref": model_ref(spec.model), "spec": checked.public, "secrets": spec_secrets(spec),
            "priority": spec.priority, "team_id": who.team_id, "created_by": who.key_id, "memory_estimate": checked.estimate}


def created(job: dict[str, Any], checked: Checked, via: str) -> dict:
    """The view of ``job`` (its row), stored and enqueued: logged as created (the line names the job and its attempt)."""
    with job_context(job["id"], job["attempt"]):
        log.info("Created job %s via %s (%s, %s) for team %s", job["id"], via, job["method"], job["model_ref"], checked.who.team_id)
    return job_reads.inserted_job_view(job)


def get(job_id: str) -> dict:
    """Return the caller's job (one statement: storage/job_reads.py)."""
    return read_job(services().db, auth.current(), job_id)


def read_job(db, who: auth.Principal, job_id: str) -> dict:
    """Return ``who``'s job; raise Forbidden below the viewer role, NotFound for a job outside their scope.

    ``get`` and api/fastpath.py (which resolves ``who`` without Flask) both answer with this.
    """
    who.require(Role.VIEWER)
    with db.connect_read() as conn:
        return job_reads.job_view_by_id(conn, job_id, team_id=who.scope)


def read_job_rows(db, who: auth.Principal, job_id: str) -> tuple[tuple, ...]:
    """``read_job``'s job as its rows (storage.job_reads.view_of makes the view); the same checks, in the same order.

    On PostgreSQL the rows may come from those this process kept (``db.job_rows``: storage/job_cache.py), which
    are forgotten at the job's change notice; a job outside ``who``'s scope is read, and not found, as before.
    """
    who.require(Role.VIEWER)
    cache = db.job_rows
    if cache is not None:
        rows = cache.get(job_id, who.scope)
        if rows is not None:
            return rows
        token = cache.token()
    with db.held_read() as conn:
        rows = job_reads.job_rows_by_id(conn, job_id, team_id=who.scope)
    if cache is not None:
        cache.put(job_id, rows, token)
    return rows


def page(*, status: str | None, limit: int, cursor: str | None, with_artifacts: bool = True) -> tuple[list[dict], str | None]:
    """Return one page of the caller's jobs (every team's for an admin), calibration texts left out."""
    return read_page(services().db, auth.current(), status=status, limit=limit, cursor=cursor, with_artifacts=with_artifacts)


def read_page(db, who: auth.Principal, *, status: str | None, limit: int, cursor: str | None,
              with_artifacts: bool = True) -> tuple[list[dict], str | None]:
    """Return one page of ``who``'s jobs and the next cursor (``page``'s answer; api/fastpath.py's too)."""
    who.require(Role.VIEWER)
    with db.connect_read() as conn:
        views, nxt = job_reads.job_views_page(conn, status=status, limit=limit, cursor=cursor, team_id=who.scope,
                                              with_artifacts=with_artifacts)
    return [summary_view(v) for v in views], nxt


def read_page_rows(db, who: auth.Principal, *, status: str | None, limit: int,
                   cursor: str | None) -> tuple[list[tuple[tuple, ...]], str | None]:
    """``read_page``'s jobs as each one's rows (``summary_view(view_of(rows))`` is its item), and the next cursor."""
    who.require(Role.VIEWER)
    cache = db.job_rows
    if cache is None:
        with db.held_read() as conn:
            return job_reads.job_rows_page(conn, status=status, limit=limit, cursor=cursor, team_id=who.scope)
    # PostgreSQL: the database chooses the page's jobs (their ids and statuses); the rows this process keeps
    # (storage/job_cache.py) are used for those whose status they show still, and the rest are read in one statement
    # (in the page's status, if it has one: a job that left it, or was deleted, since the first statement is left out).
    token = cache.token()
    with db.held_read() as conn:
        heads = job_reads.page_heads(conn, status=status, limit=limit, cursor=cursor, team_id=who.scope)
        kept = {}
        for job_id, job_status in heads[:limit]:
            rows = cache.get(job_id, who.scope)
            if rows is not None and rows[0][job_reads.STATUS] == job_status:
                kept[job_id] = rows
        missing = [job_id for job_id, _ in heads[:limit] if job_id not in kept]
        read = job_reads.job_rows_by_ids(conn, missing, team_id=who.scope, status=status) if missing else {}
    for job_id, rows in read.items():
        cache.put(job_id, rows, token)
    jobs = [kept.get(job_id) or read[job_id] for job_id, _ in heads[:limit] if job_id in kept or job_id in read]
    return jobs, (heads[limit - 1][0] if len(heads) > limit else None)


def summary_view(view: dict) -> dict:
    """Return a job view for lists: calibration and evaluation texts (megabytes) become counts.

    ``view`` is not changed; a view with no texts is returned as it is (a page's views are its own).
    """
    spec = view.get("spec") or {}
    counted = {}
    for section in ("calibration", "evaluation"):
        part = spec.get(section)
        if isinstance(part, dict) and isinstance(part.get("texts"), list):
            part = dict(part)
            part["texts_count"] = len(part.pop("texts"))
            counted[section] = part
    if counted:
        return {**view, "spec": {**spec, **counted}}
    return view if view.get("spec") is spec else {**view, "spec": {}}


def cancel(job_id: str) -> dict:
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        job_store.get_job(s, job_id, team_id=who.scope)  # another team's job is a 404 before any 403
        who.require(Role.MEMBER)
        view = job_view(job_store.request_cancel(s, job_id, team_id=who.scope, actor=who.key_id))
    with job_context(job_id, view["attempt"]):
        log.info("Cancel of job %s: now %s%s", job_id, view["status"], " (cancel requested)" if view["cancel_requested"] else "")
    return view


def retry(job_id: str) -> dict:
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        job_store.get_job(s, job_id, team_id=who.scope)
        who.require(Role.MEMBER)
        view = job_view(job_store.retry(s, job_id, team_id=who.scope, actor=who.key_id, retry_window_days=services().settings.retry_window))
    enqueue(job_id, view["attempt"])
    with job_context(job_id, view["attempt"]):
        log.info("Retry of job %s: attempt %s", job_id, view["attempt"])
    return view
