"""Thin Celery tasks: take ids, call plain objects that re-fetch rows."""

from __future__ import annotations

from quantfarm.queue import DELIVER_WEBHOOK, RUN_JOB, SWEEP
from workers.celery_app import app
from workers.context import context


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    context().runner.run(job_id)


@app.task(name=SWEEP)
def sweep() -> None:
    context().sweeper.sweep_once()


@app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> None:
    from workers.webhooks import WebhookSender

    ctx = context()
    outcome = WebhookSender(ctx.db, ctx.settings).deliver(delivery_id)
    if outcome.retry:
        ctx.dispatcher.deliver_webhook(delivery_id, countdown=outcome.retry_in)
