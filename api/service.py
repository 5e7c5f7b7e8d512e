"""Service endpoints: /healthz and /metrics (Prometheus text format, built in api/metrics.py).

Load balancers poll ``GET /healthz`` constantly, so it is answered before Flask
sees the request (``HealthFastPath``): the memo's answer, encoded once per
check, with the headers Flask would add. Anything else about it (another
method, an untrusted Host) goes to the Flask view, which answers the same way.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from flask import Blueprint, Flask, Response, current_app
from werkzeug.exceptions import SecurityError
from werkzeug.wsgi import get_host

from api.context import services

log = logging.getLogger(__name__)
bp = Blueprint("service", __name__)

HEALTH_TTL_SECONDS = 1.0
HEALTH_RETRY_AFTER_SECONDS = 2


def register_request_metrics(app: Flask) -> None:
    """Count and time every response by its route template (see api/metrics.py)."""
    from api import metrics

    metrics.register(app)


def register_health_fast_path(app: Flask) -> None:
    _memo(app)
    app.wsgi_app = HealthFastPath(app, app.wsgi_app)


class HealthMemo:
    """The last health check's answer, reused for ``ttl`` seconds: load balancers poll constantly."""

    def __init__(self, ttl: float = HEALTH_TTL_SECONDS):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -math.inf
        self._answer: tuple[dict, int] | None = None

    def get(self, check) -> tuple[dict, int]:
        with self._lock:  # one check at a time; the others wait and reuse its answer
            now = time.monotonic()
            if self._answer is None or now - self._at >= self.ttl:
                self._answer, self._at = check(), now
            return self._answer


def _check(svc) -> tuple[dict, int]:
    body: dict = {"status": "ok", "db": "ok", "broker": "ok"}
    details = {}
    for part, check in (("db", svc.db.ping), ("broker", svc.dispatcher.ping)):
        try:
            check()
        except Exception as exc:  # any failure means the part is down; say which and why, briefly
            body[part] = "down"
            details[part] = type(exc).__name__
            log.warning("Health check: %s is down (%s)", part, type(exc).__name__)
    if details:
        body["status"] = "unavailable"
        body["details"] = details
        return body, 503
    return body, 200


def _memo(app: Flask) -> HealthMemo:
    return app.extensions.setdefault("quantfarm_health", HealthMemo())


@bp.get("/healthz")
def healthz():
    svc = services()
    body, status = _memo(current_app).get(lambda: _check(svc))
    headers = {"Retry-After": str(HEALTH_RETRY_AFTER_SECONDS)} if status == 503 else {}
    return body, status, headers


class HealthFastPath:
    """WSGI middleware: ``GET /healthz`` from the memo, without a request context, hooks or routing.

    The response is the Flask view's, byte for byte: the same JSON, status, Retry-After,
    security headers (api/auth.py), and the request is counted in the HTTP metrics.
    """

    def __init__(self, app: Flask, wsgi_app):
        self.app, self.wsgi_app = app, wsgi_app
        self._encoded: tuple[object, str, list[tuple[str, str]], bytes] | None = None

    def _encode(self, answer: tuple[dict, int]):
        from api.auth import security_headers

        body, status = answer
        headers = {"Retry-After": str(HEALTH_RETRY_AFTER_SECONDS)} if status == 503 else {}
        resp = security_headers(self.app.make_response((body, status, headers)))
        data = resp.get_data()
        return answer, resp.status, list(resp.headers.items()), data

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != "/healthz" or environ.get("REQUEST_METHOD") != "GET" or environ.get("QUERY_STRING"):
            return self.wsgi_app(environ, start_response)
        trusted = self.app.config.get("TRUSTED_HOSTS")
        if trusted is not None:
            try:
                get_host(environ, trusted)
            except SecurityError:
                return self.wsgi_app(environ, start_response)  # Flask answers its 400
        started = time.perf_counter()
        svc = self.app.extensions["quantfarm"]
        answer = _memo(self.app).get(lambda: _check(svc))
        encoded = self._encoded
        if encoded is None or encoded[0] is not answer:
            with self.app.app_context():
                encoded = self._encoded = self._encode(answer)
        _, status, headers, data = encoded
        start_response(status, headers)
        self.app.extensions["quantfarm_metrics"].observe("/healthz", "GET", answer[1], time.perf_counter() - started)
        return [data]


@bp.get("/metrics")
def metrics():
    from api.metrics import CONTENT_TYPE, farm_text

    with services().db.read() as s:
        farm = farm_text(s)
    return Response(farm + current_app.extensions["quantfarm_metrics"].text(), content_type=CONTENT_TYPE)
