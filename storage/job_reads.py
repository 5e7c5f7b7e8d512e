"""The API's job reads: one statement each, the columns a view shows, no ORM objects.

GET one job and a page of jobs are most of the API's traffic. Each is one
statement, jobs LEFT JOIN artifacts (a job has at most one artifact per kind),
built once per shape with bound parameters, and run on a plain autocommit
connection (no Session, no BEGIN/COMMIT), on PostgreSQL through the driver's
own cursor (storage/lean.py: SQLAlchemy's execute and result layers were about
40% of a GET's CPU). Rows carry the view's
attributes in JOB_COLUMNS order, so storage.views builds the same objects as
from ORM rows (PostgreSQL's timestamps come back naive, in UTC, as stored).
Encrypted secrets are never selected: no view shows them.
"""

from __future__ import annotations

from collections import namedtuple
from functools import lru_cache
from typing import Any

from sqlalchemy import Integer, String, Text, any_, bindparam, cast, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from quantfarm.errors import NotFound
from storage.db import json_text
from storage.lean import Fixed
from storage.models import Artifact, Job
from storage.views import job_view

_JOBS = Job.__table__
_ARTS = Artifact.__table__
# What job_view and progress_view read from a job.
JOB_COLUMNS = ("id", "team_id", "created_by", "status", "stage", "method", "model_ref", "layers_done", "layers_total",
               "eta_seconds", "attempt", "memory_estimate", "cancel_requested", "spec", "error_code", "error_message",
               "metrics", "reused_from", "created_at", "started_at", "finished_at", "updated_at")
# What artifact_view reads from an artifact.
ARTIFACT_COLUMNS = ("id", "job_id", "kind", "format", "file_count", "size_bytes", "sha256", "location", "hub_url",
                    "hub_commit", "source_revision", "source_files", "created_at")
ArtifactRow = namedtuple("ArtifactRow", ARTIFACT_COLUMNS)
JobRow = namedtuple("JobRow", JOB_COLUMNS)
_PREFIX = "artifact_"
_N = len(JOB_COLUMNS)
STATUS = JOB_COLUMNS.index("status")


# The json columns among them, by position: ``job_rows_*`` read them as their stored text.
_JOB_JSON = tuple(JOB_COLUMNS.index(name) for name in ("spec", "metrics"))
_ARTIFACT_JSON = tuple(ARTIFACT_COLUMNS.index(name) for name in ("source_files",))
_JSON_NAMES = frozenset({"spec", "metrics", "source_files"})


def _with_artifacts(jobs, raw: bool = False):
    """``jobs`` (a table or a page subquery) LEFT JOIN artifacts, newest job first, artifacts oldest first.

    ``raw``: json columns as their stored text, undecoded.
    """
    def col(table, name, label=None):
        c = table.c[name]
        c = cast(c, Text) if raw and name in _JSON_NAMES else c
        return c.label(label or name) if raw or label else c

    art_cols = [col(_ARTS, name, _PREFIX + name) for name in ARTIFACT_COLUMNS]
    return (select(*[col(jobs, name) for name in JOB_COLUMNS], *art_cols)
            .select_from(jobs.outerjoin(_ARTS, _ARTS.c.job_id == jobs.c.id))
            .order_by(jobs.c.id.desc(), _ARTS.c.created_at))


@lru_cache(maxsize=None)
def _one_statement(scoped: bool, raw: bool = False) -> Fixed:
    stmt = _with_artifacts(_JOBS, raw).where(_JOBS.c.id == bindparam("job_id"))
    return Fixed(stmt.where(_JOBS.c.team_id == bindparam("team_id")) if scoped else stmt)


def _page_of(columns, scoped: bool, by_status: bool, after: bool):
    """SELECT ``columns`` of a page of jobs, newest first: one team's (``scoped``), in one status, after a cursor."""
    page = select(*columns).order_by(_JOBS.c.id.desc()).limit(bindparam("limit", type_=Integer))
    if scoped:
        page = page.where(_JOBS.c.team_id == bindparam("team_id"))
    if by_status:
        page = page.where(_JOBS.c.status == bindparam("status"))
    if after:
        page = page.where(_JOBS.c.id < bindparam("cursor"))
    return page


@lru_cache(maxsize=None)
def _page_statement(scoped: bool, by_status: bool, after: bool, with_artifacts: bool, raw: bool = False) -> Fixed:
    page = _page_of([_JOBS.c[name] for name in JOB_COLUMNS], scoped, by_status, after)
    return Fixed(_with_artifacts(page.subquery("page"), raw) if with_artifacts else page)


def _views(rows, with_artifacts: bool, limit: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """A job view for each of the first ``limit`` jobs in ``rows`` (one row per job and artifact), in row order,
    and the id of the job after them (None: no more)."""
    jobs: list[JobRow] = []
    arts: dict[str, list[ArtifactRow]] = {}
    more = None
    for row in rows:
        job_id = row[0]
        if job_id not in arts:
            if len(jobs) == limit:
                more = job_id
                break
            jobs.append(JobRow._make(row[:_N]))
            arts[job_id] = []
        if with_artifacts and row[_N] is not None:
            arts[job_id].append(ArtifactRow._make(row[_N:]))
    return [job_view(j, artifacts=arts[j.id]) for j in jobs], more


def job_view_by_id(conn: Connection, job_id: str, *, team_id: str | None = None) -> dict[str, Any]:
    """Return the view of one job, or raise NotFound (also for another team's job when ``team_id`` is given)."""
    params = {"job_id": job_id} if team_id is None else {"job_id": job_id, "team_id": team_id}
    views, _ = _views(_one_statement(team_id is not None).rows(conn, params), True)
    if not views:
        raise NotFound(f"No job with id {job_id!r}.", details={"resource": "job", "id": job_id})
    return views[0]


def _page_params(status, limit, cursor, team_id) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit + 1}
    if team_id is not None:
        params["team_id"] = team_id
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return params


def job_views_page(conn: Connection, *, status: str | None = None, limit: int = 50, cursor: str | None = None,
                   team_id: str | None = None, with_artifacts: bool = True) -> tuple[list[dict[str, Any]], str | None]:
    """Return one page of job views, newest first, and the cursor of the next page (one team's when given)."""
    stmt = _page_statement(team_id is not None, bool(status), bool(cursor), with_artifacts)
    views, more = _views(stmt.rows(conn, _page_params(status, limit, cursor, team_id)), with_artifacts, limit)
    return views, (views[-1]["id"] if more is not None else None)  # fetchall, not a fetchone per row


# Rows as read, for a view made from them only when needed: the json columns are their stored text (undecoded),
# so a job's rows (a tuple of row tuples) are hashable, and equal rows make the same view (api/fastpath.py keeps
# the encoded views of the rows it read last).

def job_rows_by_id(conn: Connection, job_id: str, *, team_id: str | None = None) -> tuple[tuple, ...]:
    """The rows of one job (one per artifact, at least one) for ``view_of``; raise NotFound as ``job_view_by_id``."""
    params = {"job_id": job_id} if team_id is None else {"job_id": job_id, "team_id": team_id}
    rows = tuple(_one_statement(team_id is not None, True).rows(conn, params))
    if not rows:
        raise NotFound(f"No job with id {job_id!r}.", details={"resource": "job", "id": job_id})
    return rows


def job_rows_page(conn: Connection, *, status: str | None = None, limit: int = 50, cursor: str | None = None,
                  team_id: str | None = None) -> tuple[list[tuple[tuple, ...]], str | None]:
    """``job_views_page``'s jobs as rows: each job's rows for ``view_of``, and the cursor of the next page."""
    stmt = _page_statement(team_id is not None, bool(status), bool(cursor), True, True)
    jobs: list[tuple[tuple, ...]] = []
    current: list[tuple] = []
    more = None
    for row in stmt.rows(conn, _page_params(status, limit, cursor, team_id)):
        if current and row[0] != current[0][0]:
            jobs.append(tuple(current))
            current = []
            if len(jobs) == limit:
                more = row[0]
                break
        current.append(row)
    if current and more is None:
        jobs.append(tuple(current))
    return jobs, (jobs[-1][0][0] if more is not None else None)


# A page by its jobs' ids and statuses, for the rows an API process keeps (storage/job_cache.py, PostgreSQL): the page's
# jobs are chosen by the database each time, and only the jobs whose rows are not kept are read, in one statement.

@lru_cache(maxsize=None)
def _heads_statement(scoped: bool, by_status: bool, after: bool) -> Fixed:
    return Fixed(_page_of([_JOBS.c.id, _JOBS.c.status], scoped, by_status, after))


@lru_cache(maxsize=None)
def _some_statement(scoped: bool, by_status: bool) -> Fixed:
    stmt = _with_artifacts(_JOBS, True).where(_JOBS.c.id == any_(bindparam("ids", type_=ARRAY(String))))
    if scoped:
        stmt = stmt.where(_JOBS.c.team_id == bindparam("team_id"))
    return Fixed(stmt.where(_JOBS.c.status == bindparam("status")) if by_status else stmt)


def page_heads(conn: Connection, *, status: str | None = None, limit: int = 50, cursor: str | None = None,
               team_id: str | None = None) -> list[tuple[str, str]]:
    """(id, status) of ``job_rows_page``'s jobs, newest first, and of the one after them when there is one."""
    return [(id_, st) for id_, st in _heads_statement(team_id is not None, bool(status), bool(cursor)).rows(
        conn, _page_params(status, limit, cursor, team_id))]


def job_rows_by_ids(conn: Connection, ids: list[str], *, team_id: str | None = None,
                    status: str | None = None) -> dict[str, tuple[tuple, ...]]:
    """PostgreSQL: the rows of each of ``ids``' jobs (as ``job_rows_by_id``'s), in one statement; a job not found, or
    another team's when ``team_id`` is given, or in another status when ``status`` is, is left out."""
    params: dict[str, Any] = {"ids": ids}
    if team_id is not None:
        params["team_id"] = team_id
    if status:
        params["status"] = status
    jobs: dict[str, list[tuple]] = {}
    for row in _some_statement(team_id is not None, bool(status)).rows(conn, params):
        jobs.setdefault(row[0], []).append(tuple(row))
    return {id_: tuple(rows) for id_, rows in jobs.items()}


def view_of(rows: tuple[tuple, ...]) -> dict[str, Any]:
    """The job view of one job's rows from ``job_rows_*`` (the view ``job_views_*`` make from the same rows)."""
    job = list(rows[0][:_N])
    for i in _JOB_JSON:
        job[i] = None if job[i] is None else json_text(job[i])
    artifacts = []
    for row in rows:
        if row[_N] is not None:
            art = list(row[_N:])
            for i in _ARTIFACT_JSON:
                art[i] = None if art[i] is None else json_text(art[i])
            artifacts.append(ArtifactRow._make(art))
    return job_view(JobRow._make(job), artifacts=artifacts)


def inserted_job_view(row: dict[str, Any]) -> dict[str, Any]:
    """The view of a job storage.jobs.insert_job just wrote (its columns not in ``row`` are NULL; no artifacts yet)."""
    return job_view(JobRow._make(row.get(name) for name in JOB_COLUMNS), artifacts=[])
