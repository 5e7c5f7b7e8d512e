"""The one place errors become ``{"error", "message", "details"}`` responses."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from quantfarm.errors import InvalidJSON, QuantfarmError, ValidationFailed

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: ("bad_request", "The request could not be understood."),
    401: ("unauthorized", "Authentication is required."),
    403: ("forbidden", "You are not allowed to do this."),
    404: ("not_found", "Nothing is served at this URL; see /docs for the API."),
    405: ("method_not_allowed", "This URL does not accept that HTTP method."),
    406: ("not_acceptable", "The server cannot produce a response in the requested format."),
    409: ("conflict", "The request conflicts with the current state of the resource."),
    411: ("length_required", "Send a Content-Length header with the body."),
    413: ("payload_too_large", "The request body is too large."),
    414: ("uri_too_long", "The URL is too long."),
    415: ("unsupported_media_type", "The request body has an unsupported content type."),
    429: ("too_many_requests", "Too many requests; slow down and try again."),
    500: ("internal_error", "The server hit an unexpected error; it has been logged."),
    501: ("not_implemented", "This is not implemented."),
    503: ("service_unavailable", "The service is unavailable; try again shortly."),
}


# What a 503 for an unreachable database asks clients to wait: about one restart of PostgreSQL.
DB_RETRY_AFTER_SECONDS = 2


class PayloadTooLarge(QuantfarmError):
    code = "payload_too_large"
    http_status = 413


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    resp = jsonify({"error": code, "message": message, "details": details or {}})
    resp.status_code = status
    return resp


def _quantfarm_error(exc: QuantfarmError) -> Response:
    status = exc.http_status if 400 <= exc.http_status < 600 else 500
    if status >= 500:
        log.error("%s on %s %s: %s", exc.code, request.method, request.path, exc.message)
    resp = error_response(status, exc.code, exc.message, exc.details)
    if "retry_after" in exc.details:  # 429 and 503 say when to come back
        resp.headers["Retry-After"] = str(int(exc.details["retry_after"]))
    return resp


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code, message = HTTP_CODES.get(status, (_snake(exc.name), exc.description or exc.name))
    details: dict[str, Any] = {}
    if status == 405 and exc.valid_methods:
        details["allowed"] = sorted(exc.valid_methods)
    if status == 413:
        limit = request.max_content_length
        message = f"The request body is larger than the {limit} bytes this endpoint accepts." if limit else message
        details["limit_bytes"] = limit
    resp = error_response(status, code, message, details)
    if status == 405 and exc.valid_methods:
        resp.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    return resp


def _unexpected(exc: Exception) -> Response:
    _hide_sql_parameters(exc)
    if _database_down(exc):  # a restart or failover: the client should come back, not report a bug
        log.warning("Database unavailable on %s %s: %s", request.method, request.path, type(exc).__name__)
        resp = error_response(503, "service_unavailable", "The database is unavailable; try again shortly.",
                              {"retry_after_seconds": DB_RETRY_AFTER_SECONDS})
        resp.headers["Retry-After"] = str(DB_RETRY_AFTER_SECONDS)
        return resp
    log.exception("Unhandled error on %s %s", request.method, request.path)
    code, message = HTTP_CODES[500]
    return error_response(500, code, message)


def _database_down(exc: BaseException | None) -> bool:
    from storage.db import is_transient

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_transient(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hide_sql_parameters(exc: BaseException | None) -> None:
    # SQLAlchemy prints bound parameters in its messages; a job row's parameters hold secrets.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if hasattr(exc, "hide_parameters") and hasattr(exc, "statement"):
            exc.hide_parameters = True
        exc = exc.__cause__ or exc.__context__


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "error"


def register(app: Flask) -> None:
    """Install the error handlers on ``app``."""
    app.register_error_handler(QuantfarmError, _quantfarm_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)


def json_body() -> dict[str, Any]:
    """Return the request body as a JSON object.

    Raises InvalidJSON (400) for an empty or malformed body, ValidationFailed (422)
    for JSON that is not an object.
    """
    return json_object(request.get_data(cache=True))


def json_object(raw: bytes) -> dict[str, Any]:
    """``json_body`` of the body ``raw`` (api/fastpath.py reads the body itself)."""
    if not raw.strip():
        raise InvalidJSON("The request body is empty; send a JSON object.")
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise InvalidJSON(f"The request body holds the number {exc.args[0]}, which is not finite; send a finite number.") from None
    except RecursionError:
        raise InvalidJSON("The request body nests too deeply; send a plain JSON object.") from None
    except UnicodeDecodeError:
        raise InvalidJSON("The request body is not UTF-8 text; send a UTF-8 JSON object.") from None
    except json.JSONDecodeError as exc:
        raise InvalidJSON(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
            details={"line": exc.lineno, "column": exc.colno},
        ) from None
    if not isinstance(data, dict):
        raise ValidationFailed({"body": "must be a JSON object"}, "The request body must be a JSON object.")
    if b"\\u" not in raw and b"\xed" not in raw and b"\x00" not in raw:
        # UTF-8 (an object's braces in UTF-16 or -32 have NUL bytes): a NUL in a string is escaped (\u0000), a lone
        # surrogate escaped (\ud800) or in UTF-8-like bytes (0xED 0xA0-0xBF ..., which json.loads of bytes lets
        # through). Without either, no string holds one: the two walks below (~5% of a submit's CPU) find nothing.
        return data
    try:
        where = _nul_at(data, "")
    except RecursionError:
        raise InvalidJSON("The request body nests too deeply; send a plain JSON object.") from None
    if where is not None:  # no database text column takes a NUL, and no name or path needs one
        raise ValidationFailed({where or "body": "must not contain NUL (\\u0000) characters"})
    try:
        where = _bad_text_at(data, "", _is_surrogate)
    except RecursionError:
        raise InvalidJSON("The request body nests too deeply; send a plain JSON object.") from None
    if where is not None:  # "\\ud800" alone parses, but cannot be stored or encoded as UTF-8
        raise ValidationFailed({where or "body": "must be valid Unicode text (a lone surrogate escape such as \\ud800 is not)"})
    return data


def _is_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _NotFinite(ValueError):
    pass


def _no_constant(name: str):
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def _nul_at(value: Any, path: str) -> str | None:
    """Return the dotted path of the first string (or key) holding a NUL, else None."""
    return _bad_text_at(value, path, lambda text: "\x00" in text)


def _bad_text_at(value: Any, path: str, bad) -> str | None:
    """Return the dotted path of the first string (or key) for which ``bad`` holds, else None."""
    if isinstance(value, str):
        return path if bad(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and bad(key):
            return path or "body"
        found = _bad_text_at(item, sub, bad)
        if found is not None:
            return found
    return None


def query_int(name: str, default: int, lo: int, hi: int, args=None) -> int:
    """Return an integer query parameter (of ``args``, else the request's) in [lo, hi] or raise ValidationFailed naming it."""
    raw = (request.args if args is None else args).get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValidationFailed({name: f"must be an integer from {lo} to {hi}"})
    return value
