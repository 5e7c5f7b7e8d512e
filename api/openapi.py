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

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
ERRORS = {
    400: "Malformed request (e.g. invalid JSON)",
    404: "Unknown id",
    409: "The job is in the wrong state for this action",
    413: "Body too large",
    422: "Invalid fields; details.fields names each one",
    503: "A part of the service is down",
}


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(name: str | None, description: str) -> dict:
    out: dict[str, Any] = {"description": description}
    if name:
        out["content"] = {"application/json": {"schema": _ref(name)}}
    return out


def _param(name: str, where: str = "path", schema: dict | None = None, description: str = "") -> dict:
    return {"name": name, "in": where, "required": where == "path", "schema": schema or {"type": "string"}, "description": description}


def _op(tag: str, summary: str, ok: tuple[int, str | None, str], *, errors=(), params=(), body=None, description="") -> dict:
    status, model, desc = ok
    responses = {str(status): _json(model, desc)}
    for code in errors:
        responses[str(code)] = _json("ErrorBody", ERRORS[code])
    op: dict[str, Any] = {"tags": [tag], "summary": summary, "operationId": _op_id(summary), "responses": responses}
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
        _param("status", "query", {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]}, "Only jobs in this status"),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size"),
        _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
    )
    download = {"description": "The file's bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    files_op = _op("artifacts", "Download an artifact file", (200, None, "The file's bytes"), errors=(400, 404),
                   params=(art, _param("path", description="A path from the file list")),
                   description="Streams the file, or redirects (302) to a presigned store URL when the farm is set up for that.")
    files_op["responses"]["200"] = download
    files_op["responses"]["302"] = {"description": "Redirect to a presigned URL"}
    return {
        "/v1/jobs": {
            "post": _op("jobs", "Submit a job", (201, "JobOut", "The created job, queued"), errors=(400, 413, 422), body=job_body,
                        description="Secrets (tokens, webhook secrets) are write-only: they never appear in any response."),
            "get": _op("jobs", "List jobs", (200, "JobPage", "One page of jobs, newest first"), errors=(422,), params=list_params),
        },
        "/v1/jobs/{job_id}": {"get": _op("jobs", "Get a job", (200, "JobOut", "The job"), errors=(404,), params=(job,))},
        "/v1/jobs/{job_id}/events": {"get": _op(
            "jobs", "List a job's events", (200, "EventList", "State changes, stages and progress, oldest first"), errors=(404, 422),
            params=(job, _param("after", "query", {"type": "integer", "minimum": 0}, "Only events with a larger id")))},
        "/v1/jobs/{job_id}/cancel": {"post": _op(
            "jobs", "Cancel a job", (202, "JobOut", "Queued jobs are cancelled at once; running ones stop at the next layer"),
            errors=(404, 409), params=(job,))},
        "/v1/jobs/{job_id}/retry": {"post": _op(
            "jobs", "Retry a job", (202, "JobOut", "The job, queued again; it resumes from its checkpoints"), errors=(404, 409), params=(job,))},
        "/v1/jobs/{job_id}/artifacts": {"get": _op("jobs", "List a job's artifacts", (200, "ArtifactList", "The job's artifacts"), errors=(404,), params=(job,))},
        "/v1/jobs/{job_id}/webhooks": {"get": _op(
            "webhooks", "List a job's webhook deliveries", (200, "DeliveryList", "Deliveries with every attempt"), errors=(404,), params=(job,))},
        "/v1/webhook-deliveries/{delivery_id}/replay": {"post": _op(
            "webhooks", "Replay a webhook delivery", (202, "DeliveryOut", "The delivery, pending again"), errors=(404,),
            params=(_param("delivery_id", description="Delivery id"),))},
        "/v1/artifacts/{artifact_id}": {"get": _op("artifacts", "Get an artifact", (200, "ArtifactOut", "The artifact"), errors=(404,), params=(art,))},
        "/v1/artifacts/{artifact_id}/files": {"get": _op(
            "artifacts", "List an artifact's files", (200, "FileList", "Files with sizes and sha256"), errors=(404,), params=(art,))},
        "/v1/artifacts/{artifact_id}/files/{path}": {"get": files_op},
        "/v1/uploads": {"post": _op(
            "uploads", "Upload a calibration file", (201, "UploadOut", "The stored upload"), errors=(400, 413, 422), body=upload_body,
            params=(_param("filename", "query", description="File name, for a raw text/plain body"),),
            description="Send a multipart part named `file`, or a raw UTF-8 body with ?filename=. Use the id as calibration.upload_id.")},
        "/v1/uploads/{upload_id}": {"get": _op("uploads", "Get an upload", (200, "UploadOut", "The upload's metadata"), errors=(404,),
                                               params=(_param("upload_id", description="Upload id"),))},
        "/healthz": {"get": _op("service", "Check health", (200, "Health", "The DB and the broker are up"), errors=(503,))},
        "/metrics": {"get": _op("service", "Prometheus metrics", (200, None, "Prometheus text format"))},
        "/openapi.json": {"get": _op("service", "This document", (200, None, "The OpenAPI document"))},
        "/docs": {"get": _op("service", "API reference page", (200, None, "HTML rendering of this document"))},
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
        "tags": [{"name": t} for t in ("jobs", "artifacts", "uploads", "webhooks", "service")],
        "paths": _paths(),
        "components": {"schemas": _components()},
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_openapi())


@bp.get("/docs")
def docs():
    from api.docs import render_docs

    return render_docs(build_openapi())
