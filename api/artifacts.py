"""Artifact endpoints: the file list and downloads (streamed, or redirected to a presigned URL)."""

from __future__ import annotations

import mimetypes
import unicodedata
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, redirect, request
from werkzeug.wsgi import wrap_file

from api import auth
from api.context import services
from quantfarm.errors import BadRequest, NotFound
from storage.layout import stored_prefix
from storage.models import Artifact, Job
from storage.teams import Role
from storage.views import artifact_view

bp = Blueprint("artifacts", __name__)


def store_prefix(artifact: Artifact) -> str:
    """Return the store key prefix holding an artifact's files (storage.layout)."""
    return stored_prefix(artifact)


def store_key(artifact: Artifact, path: str) -> str:
    return f"{store_prefix(artifact)}/{path}"


def file_url(artifact_id: str, path: str) -> str:
    return f"/v1/artifacts/{artifact_id}/files/{quote(path)}"


def _get_artifact(s, artifact_id: str) -> Artifact:
    """Return the caller's artifact (any team's for an admin) or raise NotFound."""
    scope = auth.require(Role.VIEWER).scope
    art = s.get(Artifact, artifact_id)
    if art is not None and scope is not None and s.get(Job, art.job_id).team_id != scope:
        art = None  # another team's artifact: the same 404 as an unknown id
    if art is None:
        raise NotFound(f"No artifact with id {artifact_id!r}.", details={"resource": "artifact", "id": artifact_id})
    return art


def _check_path(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"Invalid file path {path!r}: use a path from the artifact's file list.", code="invalid_path")


def _entry(art: Artifact, path: str) -> dict[str, Any]:
    for entry in art.files or []:
        if entry.get("path") == path:
            return entry
    raise NotFound(
        f"Artifact {art.id} has no file {path!r}; GET /v1/artifacts/{art.id}/files lists them.",
        details={"resource": "artifact_file", "id": art.id, "path": path},
    )


@bp.get("/v1/artifacts/<artifact_id>")
def get_artifact(artifact_id: str):
    with services().db.session() as s:
        return artifact_view(_get_artifact(s, artifact_id))


@bp.get("/v1/artifacts/<artifact_id>/files")
def list_files(artifact_id: str):
    with services().db.session() as s:
        art = _get_artifact(s, artifact_id)
        items = [
            {"path": f["path"], "size": f["size"], "sha256": f["sha256"], "url": file_url(art.id, f["path"])}
            for f in art.files or []
        ]
    return {"artifact_id": artifact_id, "items": items}


@bp.get("/v1/artifacts/<artifact_id>/files/<path:path>")
def download_file(artifact_id: str, path: str):
    _check_path(path)
    svc = services()
    with svc.db.session() as s:
        art = _get_artifact(s, artifact_id)
        entry = _entry(art, path)
        key = store_key(art, path)
    if svc.settings.presign_downloads:
        url = svc.store.presigned_url(key)
        if url:
            return redirect(url, 302)
    try:
        handle = svc.store.open(key)
    except KeyError:
        raise NotFound(
            f"File {path!r} of artifact {artifact_id} is listed but missing from the store.",
            details={"resource": "artifact_file", "id": artifact_id, "path": path},
        ) from None
    return _stream(handle, path, entry)


def _stream(handle, path: str, entry: dict[str, Any]) -> Response:
    mimetype = mimetypes.guess_type(path)[0] or "application/octet-stream"
    resp = Response(wrap_file(request.environ, handle), mimetype=mimetype, direct_passthrough=True)
    resp.content_length = int(entry["size"])
    name = path.rsplit("/", 1)[-1]
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii") or "download"
    if ascii_name == name:
        resp.headers.set("Content-Disposition", "attachment", filename=name)
    else:
        resp.headers.set("Content-Disposition", "attachment", filename=ascii_name, **{"filename*": f"UTF-8''{quote(name)}"})
    resp.set_etag(entry["sha256"])
    resp.headers["X-Checksum-SHA256"] = entry["sha256"]
    return resp.make_conditional(request.environ)
