"""Thin Celery tasks: take ids, call plain objects that re-fetch rows."""

from __future__ import annotations

import logging

from celery.exceptions import Reject
from celery.signals import worker_shutdown, worker_shutting_down

from quantfarm.queue import DELIVER_WEBHOOK, GC, RUN_JOB, SWEEP
from workers.celery_app import app
from workers.context import context, context_if_built

log = logging.getLogger(__name__)


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    """A wake-up: the job named is only a hint; the worker claims the best runnable job, then more."""
    runner = context().runner
    if runner.preempting:  # a stopping worker still runs what it prefetched: give the wake-up back
        raise Reject("worker stopping; the wake-up goes back to the queue", requeue=True)
    ran = runner.drain()
    log.info("woken for %s; ran %s", job_id, ran or "nothing (no runnable job)")


@worker_shutting_down.connect(weak=False)
def _preempt(**_kw) -> None:
    """On SIGTERM (sent from Celery's signal handler): stop the job at its next boundary and requeue it."""
    from workers import context as worker_context

    ctx = worker_context._context
    if ctx is not None and "runner" in ctx.__dict__:  # only a worker that built a runner has a job to hand back
        ctx.runner.preempting = True  # a plain attribute: nothing in a signal handler may lock


@app.task(name=SWEEP)
def sweep() -> None:
    context().sweeper.sweep_once()


@app.task(name=GC)
def gc() -> None:
    from storage.retention import GcAges, collect

    ctx = context()
    report = collect(ctx.db, ctx.store, ctx.settings, GcAges.from_settings(ctx.settings))
    log.info("gc: %s", report.as_dict())


@app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> None:
    context().deliveries.submit(delivery_id)  # on the delivery threads: sweeps never wait behind a receiver


@worker_shutdown.connect
def _stop_deliveries(**_) -> None:
    ctx = context_if_built()
    if ctx is not None and "deliveries" in ctx.__dict__:
        ctx.deliveries.shutdown()
