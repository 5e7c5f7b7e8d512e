"""Calibration uploads: a text file stored under ``uploads/{id}/`` with a ``meta.json``."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from flask import Blueprint, current_app, request
from werkzeug.utils import secure_filename

from api import auth
from api.context import services
from api.errors import PayloadTooLarge
from quantfarm.errors import NotFound, ValidationFailed
from quantfarm.store import BlobStore
from storage.layout import UPLOAD_META as META
from storage.layout import upload_prefix
from storage.models import DEFAULT_TEAM_ID, new_id, utcnow
from storage.teams import Role
from storage.views import iso

log = logging.getLogger(__name__)
bp = Blueprint("uploads", __name__)

_UPLOAD_ID = re.compile(r"^upl_[0-9a-z]{26}$")
CHUNK = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file


def read_meta(store: BlobStore, upload_id: str, team_id: str | None) -> dict | None:
    """Return a finished upload's metadata (its meta.json is written last), or None.

    None too for another team's upload when ``team_id`` is given.
    """
    if not _UPLOAD_ID.match(upload_id):
        return None
    try:
        meta = json.loads(store.get_bytes(f"{upload_prefix(upload_id)}/{META}"))
    except KeyError:
        return None
    if team_id is not None and meta.get("team_id", DEFAULT_TEAM_ID) != team_id:
        return None
    return meta


def upload_exists(store: BlobStore, upload_id: str, team_id: str | None = None) -> bool:
    """Return whether a finished upload with this id exists (and belongs to ``team_id`` when given)."""
    return read_meta(store, upload_id, team_id) is not None


def _receive(src: BinaryIO, limit: int, field: str) -> tuple[Path, int, str]:
    """Copy ``src`` to a temporary file, checking size and UTF-8; return (path, size, sha256).

    Raises PayloadTooLarge past ``limit`` bytes, ValidationFailed for empty or non-UTF-8 data.
    """
    digest, size = hashlib.sha256(), 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    fd, name = tempfile.mkstemp(prefix="qf-upload-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                size += len(block)
                if size > limit:
                    raise _too_large(limit)
                decoder.decode(block)
                digest.update(block)
                out.write(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        path.unlink(missing_ok=True)
        raise ValidationFailed({field: "must be UTF-8 text"}, "A calibration file must be UTF-8 text.") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise ValidationFailed({field: "is empty"}, "The calibration file is empty.")
    return path, size, digest.hexdigest()


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The file is larger than the {limit} bytes an upload may hold.", details={"limit_bytes": limit})


def _clean_filename(raw: str | None, field: str) -> str:
    if not raw:
        raise ValidationFailed({field: "field required"}, "Name the file: a multipart 'file' part, or ?filename= with a raw body.")
    name = secure_filename(raw)[-200:]  # keep the end: the extension says what it is
    if not name:
        raise ValidationFailed({field: "must contain letters or digits"})
    if name.lower() == META:
        raise ValidationFailed({field: f"{META} is reserved; rename the file"})
    return name


@bp.post("/v1/uploads")
def create_upload():
    who = auth.require(Role.MEMBER)
    limit = int(current_app.config["MAX_UPLOAD_BYTES"])
    request.max_content_length = limit + MULTIPART_OVERHEAD
    if (request.content_length or 0) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    if request.mimetype == "multipart/form-data":
        part = request.files.get("file")
        if part is None:
            raise ValidationFailed({"file": "field required"}, "Send the file as a multipart part named 'file'.")
        filename = _clean_filename(part.filename, "file")
        src, field = part.stream, "file"
    else:
        filename = _clean_filename(request.args.get("filename"), "filename")
        src, field = request.stream, "body"
    path, size, sha = _receive(src, limit, field)
    upload_id = new_id("upl")
    meta = {"id": upload_id, "team_id": who.team_id, "filename": filename, "size_bytes": size, "sha256": sha,
            "created_at": iso(utcnow())}
    store = services().store
    try:
        store.put_file(f"{upload_prefix(upload_id)}/{filename}", path)
        store.put_bytes(f"{upload_prefix(upload_id)}/{META}", json.dumps(meta).encode())
    finally:
        path.unlink(missing_ok=True)
    log.info("Stored upload %s (%s, %d bytes)", upload_id, filename, size)
    return meta, 201, {"Location": f"/v1/uploads/{upload_id}"}


@bp.get("/v1/uploads/<upload_id>")
def get_upload(upload_id: str):
    meta = read_meta(services().store, upload_id, auth.require(Role.VIEWER).scope)
    if meta is None:
        raise NotFound(f"No upload with id {upload_id!r}.", details={"resource": "upload", "id": upload_id})
    return meta
