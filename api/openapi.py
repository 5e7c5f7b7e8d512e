"""The OpenAPI 3.1 document, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema

import quantfarm
from api import schemas
from quantfarm import registry
from quantfarm.spec import spec_schema
from storage.jobs import JobStatus

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
ERRORS = {
    400: "Malformed request (e.g. invalid JSON)",
    401: "No API key, or an unknown or revoked one",
    403: "The key's role does not allow this",
    404: "Unknown id, or another team's object",
    409: "The job is in the wrong state for this action",
    413: "Body too large",
    422: "Invalid fields; details.fields names each one",
    429: "The team is over its queued-job quota; see Retry-After",
    503: "A part of the service is down",
}
# The role each operation needs ("x-role"), and the path parameter naming a team's object
# ("x-team-object"): another team's object is a 404 for every role. The isolation tests
# read both from this document, so a new route cannot skip them.
BEARER = [{"apiKey": []}]


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(name: str | None, description: str) -> dict:
    out: dict[str, Any] = {"description": description}
    if name:
        out["content"] = {"application/json": {"schema": _ref(name)}}
    return out


def _param(name: str, where: str = "path", schema: dict | None = None, description: str = "") -> dict:
    return {"name": name, "in": where, "required": where == "path", "schema": schema or {"type": "string"}, "description": description}


def _op(tag: str, summary: str, ok: tuple[int, str | None, str], *, errors=(), params=(), body=None, description="",
        role: str | None = "viewer", owned: str | None = None) -> dict:
    status, model, desc = ok
    responses = {str(status): _json(model, desc)}
    if role is not None:
        errors = (401, 403, *errors) if role != "viewer" else (401, *errors)
    for code in sorted(set(errors)):
        responses[str(code)] = _json("ErrorBody", ERRORS[code])
    op: dict[str, Any] = {"tags": [tag], "summary": summary, "operationId": _op_id(summary), "responses": responses,
                          "security": BEARER if role is not None else [], "x-role": role}
    if owned is not None:
        op["x-team-object"] = owned
    if description:
        op["description"] = description
    if params:
        op["parameters"] = list(params)
    if body:
        op["requestBody"] = body
    return op


def _op_id(summary: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in summary).split()
    return words[0].lower() + "".join(w.capitalize() for w in words[1:])


def _paths() -> dict[str, dict]:
    job = _param("job_id", description="Job id")
    art = _param("artifact_id", description="Artifact id")
    job_body = {"required": True, "content": {"application/json": {"schema": _ref("JobSpec")}}}
    upload_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
    list_params = (
        _param("status", "query", {"type": "string", "enum": [st.value for st in JobStatus]}, "Only jobs in this status"),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size"),
        _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
    )
    download = {"description": "The file's bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    files_op = _op("artifacts", "Download an artifact file", (200, None, "The file's bytes"), errors=(400, 404),
                   params=(art, _param("path", description="A path from the file list")), owned="artifact_id",
                   description="Streams the file, or redirects (302) to a presigned store URL when the farm is set up for that.")
    files_op["responses"]["200"] = download
    files_op["responses"]["302"] = {"description": "Redirect to a presigned URL"}
    key = _param("key_id", description="API key id")
    dlv = _param("delivery_id", description="Delivery id")
    upl = _param("upload_id", description="Upload id")
    any_json = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/v1/jobs": {
            "post": _op("jobs", "Submit a job", (201, "JobOut", "The created job, queued"), errors=(400, 413, 422, 429), body=job_body,
                        role="member",
                        description="Secrets (tokens, webhook secrets and URLs) are write-only: they never appear in any response. "
                                    "Checks run in this order: body (400/422), key (401/403), quota (429), admission (422)."),
            "get": _op("jobs", "List jobs", (200, "JobPage", "One page of the team's jobs (every team's for an admin), newest first"),
                       errors=(422,), params=list_params),
        },
        "/v1/jobs/{job_id}": {"get": _op("jobs", "Get a job", (200, "JobOut", "The job"), errors=(404,), params=(job,), owned="job_id")},
        "/v1/jobs/{job_id}/events": {"get": _op(
            "jobs", "List a job's events", (200, "EventList", "State changes, stages and progress, oldest first"), errors=(404, 422),
            params=(job, _param("after", "query", {"type": "integer", "minimum": 0}, "Only events with a larger id")), owned="job_id")},
        "/v1/jobs/{job_id}/cancel": {"post": _op(
            "jobs", "Cancel a job", (202, "JobOut", "Queued jobs are cancelled at once; running ones stop within seconds, in any stage"),
            errors=(404, 409), params=(job,), role="member", owned="job_id")},
        "/v1/jobs/{job_id}/retry": {"post": _op(
            "jobs", "Retry a job", (202, "JobOut", "The job, queued again; it resumes from its checkpoints"), errors=(404, 409),
            params=(job,), role="member", owned="job_id")},
        "/v1/jobs/{job_id}/artifacts": {"get": _op("jobs", "List a job's artifacts", (200, "ArtifactList", "The job's artifacts"),
                                                   errors=(404,), params=(job,), owned="job_id")},
        "/v1/jobs/{job_id}/webhooks": {"get": _op(
            "webhooks", "List a job's webhook deliveries", (200, "DeliveryList", "Deliveries with every attempt"), errors=(404,),
            params=(job,), owned="job_id")},
        "/v1/webhook-deliveries/{delivery_id}/replay": {"post": _op(
            "webhooks", "Replay a webhook delivery", (202, "DeliveryOut", "The delivery, pending again"), errors=(404, 409),
            params=(dlv,), role="member", owned="delivery_id")},
        "/v1/artifacts/{artifact_id}": {"get": _op("artifacts", "Get an artifact", (200, "ArtifactOut", "The artifact"), errors=(404,),
                                                   params=(art,), owned="artifact_id")},
        "/v1/artifacts/{artifact_id}/files": {"get": _op(
            "artifacts", "List an artifact's files", (200, "FileList", "Files with sizes and sha256"), errors=(404,), params=(art,),
            owned="artifact_id")},
        "/v1/artifacts/{artifact_id}/files/{path}": {"get": files_op},
        "/v1/uploads": {"post": _op(
            "uploads", "Upload a calibration file", (201, "UploadOut", "The stored upload"), errors=(400, 413, 422), body=upload_body,
            params=(_param("filename", "query", description="File name, for a raw text/plain body"),), role="member",
            description="Send a multipart part named `file`, or a raw UTF-8 body with ?filename=. Use the id as calibration.upload_id.")},
        "/v1/uploads/{upload_id}": {"get": _op("uploads", "Get an upload", (200, "UploadOut", "The upload's metadata"), errors=(404,),
                                               params=(upl,), owned="upload_id")},
        "/v1/me": {"get": _op("access", "Who am I", (200, "MeOut", "The key's team and role"))},
        "/v1/workers": {"get": _op("farm", "List workers", (200, "FarmOut", "Utilization and queue depth; admins also see each worker's job and team"))},
        "/v1/teams": {
            "post": _op("access", "Create a team", (201, "TeamOut", "The team"), errors=(400, 409, 422), body=any_json, role="admin"),
            "get": _op("access", "List teams", (200, "TeamList", "Every team"), role="admin"),
        },
        "/v1/keys": {
            "post": _op("access", "Create an API key", (201, "KeyCreated", "The key, shown this once"), errors=(400, 404, 422),
                        body=any_json, role="member",
                        description="Body: `team` (admins only; default the caller's), `role` (admin, member or viewer; "
                                    "no stronger than the caller's), `name`."),
            "get": _op("access", "List API keys", (200, "KeyList", "The team's keys (every team's for an admin), never the keys"),
                       role="member"),
        },
        "/v1/keys/{key_id}": {"delete": _op("access", "Revoke an API key", (200, "KeyOut", "The revoked key"), errors=(404,),
                                            params=(key,), role="member", owned="key_id")},
        "/v1/credentials": {
            "post": _op("access", "Store a team credential", (201, "CredentialOut", "The credential, without its secret"),
                        errors=(400, 422), body=any_json, role="member",
                        description="`{name, kind: hub, token}` or `{name, kind: s3, access_key_id, secret_access_key}`; "
                                    "reference it from a spec as `credentials_ref`. Write-only; posting a name again replaces it."),
            "get": _op("access", "List team credentials", (200, "CredentialList", "Names and kinds, never secrets")),
        },
        "/v1/credentials/{name}": {"delete": _op("access", "Delete a team credential", (200, "CredentialOut", "The deleted credential"),
                                                 errors=(404,), params=(_param("name", description="Credential name"),), role="member",
                                                 owned="name")},
        "/healthz": {"get": _op("service", "Check health", (200, "Health", "The DB and the broker are up"), errors=(503,), role=None)},
        "/metrics": {"get": _op("service", "Prometheus metrics", (200, None, "Prometheus text format"), role=None)},
        "/openapi.json": {"get": _op("service", "This document", (200, None, "The OpenAPI document"), role=None)},
        "/docs": {"get": _op("service", "API reference page", (200, None, "HTML rendering of this document"), role=None)},
    }


def _components() -> dict[str, dict]:
    request = spec_schema()
    out: dict[str, dict] = dict(request.pop("$defs"))
    out["JobSpec"] = {"title": "JobSpec", "description": "A job submission; `method` picks the options model.", **request}
    _, defs = models_json_schema([(m, "serialization") for m in schemas.RESPONSE_MODELS], ref_template=REF)
    for name, schema in defs.get("$defs", {}).items():
        if name in out and out[name] != schema:
            raise RuntimeError(f"Schema name {name!r} is used by a request and a response model")
        out[name] = schema
    return out


def build_openapi() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the API (rebuilt when the method registry changes)."""
    return _build_openapi(registry.generation())


@lru_cache(maxsize=2)
def _build_openapi(_generation: int) -> dict[str, Any]:
    names = ", ".join(registry.method_names())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Quantfarm API",
            "version": quantfarm.__version__,
            "description": f"Submit and follow model quantization jobs (methods: {names}; formats: {', '.join(registry.format_names())}). "
            "Errors are `{error, message, details}`; a bad body is 422 with `details.fields`.",
        },
        "tags": [{"name": t} for t in ("jobs", "artifacts", "uploads", "webhooks", "access", "farm", "service")],
        "paths": _paths(),
        "security": BEARER,
        "components": {
            "schemas": _components(),
            "securitySchemes": {"apiKey": {
                "type": "http", "scheme": "bearer",
                "description": "An API key from `quantfarm keys create` or POST /v1/keys. Roles: viewer (read), member (submit "
                               "and act on the team's jobs), admin (every team). Another team's object is a 404.",
            }},
        },
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_openapi())


@bp.get("/docs")
def docs():
    from api.docs import render_docs

    return render_docs(build_openapi())
