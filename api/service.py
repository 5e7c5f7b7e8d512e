"""Service endpoints: /healthz and /metrics (Prometheus text format, built in api/metrics.py).

Load balancers poll ``GET /healthz`` constantly: it answers from a 1 s memo
of the checks, and a plain GET of it is answered before Flask sees the request
(api/fastpath.py) from the same memo, with the same bytes and headers.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from flask import Blueprint, Flask, Response, current_app

from api.context import services

log = logging.getLogger(__name__)
bp = Blueprint("service", __name__)

HEALTH_TTL_SECONDS = 1.0
HEALTH_RETRY_AFTER_SECONDS = 2


def register_request_metrics(app: Flask) -> None:
    """Count and time every response by its route template (see api/metrics.py)."""
    from api import metrics

    metrics.register(app)


def register_health(app: Flask) -> None:
    """Give the app its health memo (the view and api/fastpath.py answer from it)."""
    app.extensions["quantfarm_health"] = HealthMemo()


class HealthMemo:
    """The last health check's answer, reused for ``ttl`` seconds: load balancers poll constantly."""

    def __init__(self, ttl: float = HEALTH_TTL_SECONDS):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -math.inf
        self._answer: tuple[dict, int] | None = None

    def get(self, check) -> tuple[dict, int]:
        """The memo's answer; a stale one is checked again by one caller while the others keep the last answer.

        Only the very first check is waited for: no probe queues behind a slow database ping.
        """
        answer, at = self._answer, self._at
        if answer is not None and time.monotonic() - at < self.ttl:
            return answer
        if not self._lock.acquire(blocking=answer is None):
            return answer  # another caller is checking now
        try:
            now = time.monotonic()
            if self._answer is None or now - self._at >= self.ttl:
                self._answer, self._at = check(), now
            return self._answer
        finally:
            self._lock.release()


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


def health_answer(app: Flask) -> tuple[dict, int]:
    """The health body and status, from the app's memo (the same tuple until the next check)."""
    svc = app.extensions["quantfarm"]
    return app.extensions["quantfarm_health"].get(lambda: _check(svc))


def health_headers(status: int) -> dict[str, str]:
    return {"Retry-After": str(HEALTH_RETRY_AFTER_SECONDS)} if status == 503 else {}


@bp.get("/healthz")
def healthz():
    body, status = health_answer(current_app)
    return body, status, health_headers(status)


@bp.get("/metrics")
def metrics():
    from api.metrics import CONTENT_TYPE, farm_text

    with services().db.read() as s:
        farm = farm_text(s)
    return Response(farm + current_app.extensions["quantfarm_metrics"].text(), content_type=CONTENT_TYPE)
