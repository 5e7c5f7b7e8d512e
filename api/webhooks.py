"""Webhook delivery log: list a job's deliveries with every attempt, and replay one."""

from __future__ import annotations

import logging

from flask import Blueprint
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api import auth
from api.context import services
from storage import jobs as job_store
from storage import webhooks as webhook_store
from storage.models import WebhookDelivery
from storage.teams import Role
from storage.views import delivery_view

log = logging.getLogger(__name__)
bp = Blueprint("webhooks", __name__)


@bp.get("/v1/jobs/<job_id>/webhooks")
def job_webhooks(job_id: str):
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        job_store.get_job(s, job_id, team_id=who.scope)
        rows = s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .options(selectinload(WebhookDelivery.attempt_log))
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
        return {"items": [delivery_view(d) for d in rows]}


@bp.post("/v1/webhook-deliveries/<delivery_id>/replay")
def replay_delivery(delivery_id: str):
    svc = services()
    who = auth.require(Role.VIEWER)
    with svc.db.session() as s:
        d = webhook_store.get_delivery(s, delivery_id, team_id=who.scope)
        who.require(Role.MEMBER)
        # A fresh attempt budget; the attempt log is kept and the same bytes go out
        # under the same webhook-id. 404 for an unknown id, 409 while still pending.
        d = webhook_store.replay(s, delivery_id)
        view = delivery_view(d)
    try:
        svc.dispatcher.deliver_webhook(delivery_id)
    except Exception as exc:  # the delivery is pending in the DB; the webhook sweep sends it
        log.warning("Could not enqueue webhook delivery %s (%s); it stays pending.", delivery_id, type(exc).__name__)
    log.info("Replay of webhook delivery %s requested", delivery_id)
    return view, 202
