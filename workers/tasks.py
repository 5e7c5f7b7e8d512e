"""Thin Celery tasks: take ids, call plain objects that re-fetch rows."""

from __future__ import annotations

from celery.signals import worker_shutdown

from quantfarm.queue import DELIVER_WEBHOOK, RUN_JOB, SWEEP
from workers.celery_app import app
from workers.context import context, context_if_built


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    context().runner.run(job_id)


@app.task(name=SWEEP)
def sweep() -> None:
    context().sweeper.sweep_once()


@app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> None:
    context().deliveries.submit(delivery_id)  # on the delivery threads: sweeps never wait behind a receiver


@worker_shutdown.connect
def _stop_deliveries(**_) -> None:
    ctx = context_if_built()
    if ctx is not None and "deliveries" in ctx.__dict__:
        ctx.deliveries.shutdown()
