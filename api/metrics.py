"""Prometheus metrics of the API: HTTP traffic summed over gunicorn workers, the farm's state from the database.

Under gunicorn, ``gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at a
directory fresh for each master, so every worker's counts land there and a
scrape (answered by any one worker) sums them all. Without it (the embedded
server) the counts live in the process. Labels stay bounded whatever clients
send: the route is the matched URL rule (never the URL), the method one of a
fixed set, the status code one the app produced.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque

import prometheus_client
from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy import func, select

from storage.jobs import TERMINAL, JobStatus
from storage.models import Job, WebhookDelivery

prometheus_client.disable_created_metrics()

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"
SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Under gunicorn, how long a worker's HTTP counts may wait before they reach the shared files (a scrape answered by
# that worker sees its own at once).
FLUSH_SECONDS = 0.5
QUANTILES = (0.5, 0.9, 0.99)
DELIVERY_STATUSES = ("pending", "delivered", "failed", "disabled")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class HttpMetrics:
    """The request counter and latency histogram of one app.

    Without a multiprocess directory every request is counted as it ends. Under
    gunicorn (``PROMETHEUS_MULTIPROC_DIR``) each value prometheus_client keeps is a
    slot in a memory-mapped file written under one process-wide lock, with a
    getpid, at every increment: three a request, about a tenth of a GET's CPU, and
    8 threads queueing on that lock. There a request appends (route, method, code,
    seconds) to this process's pending deque (atomic: no lock), and the pending
    requests go to the files, one increment a series and bucket, every
    ``FLUSH_SECONDS`` (a thread), before this process answers a scrape, and at exit:
    the same counts and buckets, a worker's last half second later.
    """

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("quantfarm_http_requests", "HTTP requests by route, method and status code.",
                                ["route", "method", "code"], registry=self.registry)
        self.seconds = Histogram("quantfarm_http_request_duration_seconds", "Time to answer an HTTP request, by route and method.",
                                 ["route", "method"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self._children: dict[tuple[str, str, int], tuple] = {}  # each label set's counter and histogram, looked up once
        self.deferred = multiprocess_dir() is not None
        self._pending: deque[tuple[str, str, int, float]] = deque()
        self._flusher: threading.Thread | None = None
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (m := me()) is not None and setattr(m, "_flusher", None))

    def _series(self, key: tuple[str, str, int]) -> tuple:
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(key[0], key[1], str(key[2])), self.seconds.labels(key[0], key[1]))
        return children

    def observe(self, route: str, method: str, code: int, seconds: float) -> None:
        method = method if method in METHODS else "other"  # bounded: routes and codes are the app's own
        if self.deferred:
            self._pending.append((route, method, code, seconds))
            if self._flusher is None:  # the first request of this process
                self._start_flusher()
            return
        children = self._series((route, method, code))
        children[0].inc()
        children[1].observe(seconds)

    def flush(self) -> None:
        """Add the pending requests to the shared files: one increment a series and bucket."""
        pending, sums = self._pending, {}
        while pending:
            route, method, code, seconds = pending.popleft()
            got = sums.get((route, method, code))
            if got is None:
                got = sums[(route, method, code)] = [0, 0.0, [0] * (len(SECONDS_BUCKETS) + 1)]
            got[0] += 1
            got[1] += seconds
            got[2][bisect_left(SECONDS_BUCKETS, seconds)] += 1  # the first bound >= seconds, as Histogram.observe picks
        for key, (count, total, buckets) in sums.items():
            counter, histogram = self._series(key)
            counter.inc(count)
            histogram._sum.inc(total)  # what Histogram.observe increments, once for all the requests
            for value, n in zip(histogram._buckets, buckets):
                if n:
                    value.inc(n)

    def _start_flusher(self) -> None:
        me = weakref.ref(self)

        def loop():
            while (m := me()) is not None:
                del m
                time.sleep(FLUSH_SECONDS)
                if (m := me()) is not None:
                    m.flush()

        self._flusher = threading.Thread(target=loop, name="http-metrics-flush", daemon=True)
        self._flusher.start()
        atexit.register(lambda: (m := me()) is not None and m.flush())

    def text(self) -> bytes:
        """This app's HTTP metrics, summed over every process of a gunicorn master when multiprocess."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        self.flush()
        merged = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)


def register(app: Flask) -> HttpMetrics:
    """Count and time every response by its route template."""
    metrics = HttpMetrics()
    app.extensions["quantfarm_metrics"] = metrics

    @app.before_request
    def _start():
        g.quantfarm_started = time.perf_counter()

    @app.after_request
    def _count(resp):
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        started = g.get("quantfarm_started")
        metrics.observe(route, request.method, resp.status_code, time.perf_counter() - started if started else 0.0)
        return resp

    return metrics


class FarmCollector:
    """The farm's state, read from the database at scrape time (the same answer from every process)."""

    def __init__(self, session):
        self.s = session

    def collect(self):
        yield self._jobs()
        yield self._queue_depth()
        yield self._running()
        yield self._failures()
        yield self._durations()
        yield self._deliveries()

    def _jobs(self):
        fam = GaugeMetricFamily("quantfarm_jobs", "Jobs by status.", labels=["status"])
        counts = dict(self.s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for st in JobStatus:
            fam.add_metric([st.value], counts.get(st.value, 0))
        return fam

    def _queue_depth(self):
        team = getattr(Job, "team_id", None)  # jobs belong to teams once auth lands; one series per team then
        labels = ["priority", "team"] if team is not None else ["priority"]
        fam = GaugeMetricFamily("quantfarm_queue_depth", "Queued jobs by priority (and team).", labels=labels)
        cols = [Job.priority, team] if team is not None else [Job.priority]
        rows = self.s.execute(select(*cols, func.count()).where(Job.status == JobStatus.QUEUED.value).group_by(*cols)).all()
        for *keys, n in rows:
            fam.add_metric([str(k if k is not None else "") for k in keys], n)
        return fam

    def _running(self):
        fam = GaugeMetricFamily("quantfarm_running_jobs", "Running jobs by method.", labels=["method"])
        rows = self.s.execute(select(Job.method, func.count()).where(Job.status == JobStatus.RUNNING.value).group_by(Job.method)).all()
        for method, n in rows:
            fam.add_metric([method], n)
        return fam

    def _failures(self):
        fam = CounterMetricFamily("quantfarm_job_failures", "Failed jobs by error code.", labels=["error_code"])
        rows = self.s.execute(select(Job.error_code, func.count()).where(Job.status == JobStatus.FAILED.value).group_by(Job.error_code)).all()
        for code, n in rows:
            fam.add_metric([code or "unknown"], n)
        return fam

    def _durations(self):
        fam = SummaryMetricFamily("quantfarm_job_duration_seconds", "Run time of finished jobs (last attempt).", labels=["method", "status"])
        rows = self.s.execute(select(Job.method, Job.status, Job.started_at, Job.finished_at).where(
            Job.status.in_([t.value for t in TERMINAL]), Job.started_at.is_not(None), Job.finished_at.is_not(None))).all()
        groups: dict[tuple[str, str], list[float]] = {}
        for method, status, started, finished in rows:
            groups.setdefault((method, status), []).append(max(0.0, (finished - started).total_seconds()))
        for (method, status), values in sorted(groups.items()):
            values.sort()
            fam.add_metric([method, status], count_value=len(values), sum_value=round(sum(values), 3))
            for q in QUANTILES:  # nearest rank: exact for the finished jobs the database holds
                fam.add_sample("quantfarm_job_duration_seconds", {"method": method, "status": status, "quantile": str(q)},
                               round(values[max(0, math.ceil(q * len(values)) - 1)], 3))
        return fam

    def _deliveries(self):
        fam = GaugeMetricFamily("quantfarm_webhook_deliveries", "Webhook deliveries by outcome.", labels=["status"])
        counts = dict(self.s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all())
        for st in DELIVERY_STATUSES:
            fam.add_metric([st], counts.get(st, 0))
        return fam


def farm_text(session) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(session))
    return generate_latest(registry)
