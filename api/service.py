"""Service endpoints: /healthz and /metrics (Prometheus text format)."""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter

from flask import Blueprint, Flask, Response, current_app, request
from sqlalchemy import func, select

from api.context import services
from storage.jobs import TERMINAL, JobStatus
from storage.models import Job

log = logging.getLogger(__name__)
bp = Blueprint("service", __name__)

QUANTILES = (0.5, 0.9, 0.99)


class RequestCounter:
    """HTTP requests by route, method and status code (per process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str, int]] = Counter()

    def add(self, route: str, method: str, code: int) -> None:
        with self._lock:
            self.counts[(route, method, code)] += 1

    def snapshot(self) -> list[tuple[tuple[str, str, int], int]]:
        with self._lock:
            return sorted(self.counts.items())


def register_request_metrics(app: Flask) -> None:
    """Count every response by its route template (not its URL, which would explode the labels)."""
    counter = RequestCounter()
    app.extensions["quantfarm_requests"] = counter

    @app.after_request
    def _count(resp):
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        counter.add(route, request.method, resp.status_code)
        return resp


@bp.get("/healthz")
def healthz():
    svc = services()
    body = {"status": "ok", "db": "ok", "broker": "ok"}
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
    return body


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in kv.items()) + "}"


def _quantile(sorted_values: list[float], q: float) -> float:
    # Nearest-rank quantile: exact for the finished jobs the DB holds.
    idx = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[idx]


def _job_lines(s) -> list[str]:
    counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines = ["# HELP quantfarm_jobs Jobs by status.", "# TYPE quantfarm_jobs gauge"]
    for st in JobStatus:
        lines.append(f"quantfarm_jobs{_labels(status=st.value)} {counts.get(st.value, 0)}")
    rows = s.execute(
        select(Job.method, Job.status, Job.started_at, Job.finished_at).where(
            Job.status.in_([t.value for t in TERMINAL]), Job.started_at.is_not(None), Job.finished_at.is_not(None)
        )
    ).all()
    groups: dict[tuple[str, str], list[float]] = {}
    for method, status, started, finished in rows:
        groups.setdefault((method, status), []).append(max(0.0, (finished - started).total_seconds()))
    lines += ["# HELP quantfarm_job_duration_seconds Run time of finished jobs (last attempt).", "# TYPE quantfarm_job_duration_seconds summary"]
    for (method, status), values in sorted(groups.items()):
        values.sort()
        for q in QUANTILES:
            lines.append(f"quantfarm_job_duration_seconds{_labels(method=method, status=status, quantile=q)} {_quantile(values, q):.3f}")
        lines.append(f"quantfarm_job_duration_seconds_sum{_labels(method=method, status=status)} {sum(values):.3f}")
        lines.append(f"quantfarm_job_duration_seconds_count{_labels(method=method, status=status)} {len(values)}")
    return lines


@bp.get("/metrics")
def metrics():
    with services().db.session() as s:
        lines = _job_lines(s)
    lines += ["# HELP quantfarm_http_requests_total HTTP requests by route, method and status code.", "# TYPE quantfarm_http_requests_total counter"]
    for (route, method, code), n in current_app.extensions["quantfarm_requests"].snapshot():
        lines.append(f"quantfarm_http_requests_total{_labels(route=route, method=method, code=code)} {n}")
    return Response("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4; charset=utf-8")
