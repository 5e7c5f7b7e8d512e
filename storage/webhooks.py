"""Webhook deliveries in the database: the outbox rows and their attempt log.

A delivery is created in the same transaction that ends the job, with its
payload serialized once, so every retry sends the same bytes under the same
``webhook-id``. Each send is claimed first with a compare-and-set on the attempt
counter, so two workers holding the same task never both send attempt N.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from quantfarm.errors import InvalidState, NotFound
from quantfarm.spec import mask_url
from storage.models import Job, WebhookAttempt, WebhookDelivery, new_id, utcnow
from storage.views import iso

EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED, DISABLED = "pending", "delivered", "failed", "disabled"


def event_type_for(status: str) -> str:
    """Return the event type of a terminal job status.

    Raises InvalidState for a job that has not ended.
    """
    try:
        return EVENT_TYPES[status]
    except KeyError:
        raise InvalidState(f"A job that is {status} has no webhook event; only ended jobs notify.") from None


def build_payload(event_type: str, job_object: dict[str, Any], at: datetime) -> str:
    """Serialize the Standard Webhooks body ``{"type", "timestamp", "data"}`` once."""
    body = {"type": event_type, "timestamp": iso(at), "data": job_object}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


REDACTED = "[redacted]"


def _scrub(value: Any, needles: list[str]) -> Any:
    """Return ``value`` (a JSON-like tree) with every needle cut out of its strings and keys."""
    if isinstance(value, str):
        for n in needles:
            value = value.replace(n, REDACTED)
        return value
    if isinstance(value, dict):
        return {_scrub(k, needles): _scrub(v, needles) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, needles) for v in value]
    return value


def scrub_secrets(payload_job: dict[str, Any], secrets: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Cut any secret value out of the job object; return it and the names of the secrets found.

    The job object should already be secret-free. A user can still paste a token into a
    label; then the token is cut out rather than mailed to a receiver, and the job still
    ends (refusing here would leave it stuck in ``running``).
    """
    found = sorted(k for k, v in secrets.items() if v and str(v) in json.dumps(payload_job, ensure_ascii=False))
    if not found:
        return payload_job, []
    return _scrub(payload_job, sorted({str(secrets[k]) for k in found}, key=len, reverse=True)), found


def create_deliveries(session: Session, job: Job, payload_job: dict[str, Any], secrets: dict[str, str] | None = None) -> list[str]:
    """Create one pending delivery per webhook of ``job`` for its terminal event; return their ids.

    Idempotent: hooks that already have a delivery for this event keep it (and
    its id is returned). ``secrets`` (default: the job's) are only used to make
    sure none of them leaks into the payload; they are never stored here.
    Raises InvalidState if the job has not ended.
    """
    hooks = (job.spec or {}).get("webhooks") or []
    if not hooks:
        return []
    event = event_type_for(job.status)
    now = utcnow()
    payload_job, leaked = scrub_secrets(payload_job, (job.secrets or {}) if secrets is None else secrets)
    if leaked:
        log.warning("job %s: the webhook payload held the secret(s) %s; they were cut out", job.id, ", ".join(leaked))
    body = build_payload(event, payload_job, job.finished_at or now)
    # The terminal transition is a compare-and-set, so only one process gets here per
    # event; checking first keeps the caller's transaction free of IntegrityErrors.
    existing = {
        d.hook_index: d.id
        for d in session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.job_id == job.id, WebhookDelivery.job_attempt == job.attempt, WebhookDelivery.event_type == event))
    }
    ids = []
    for i, hook in enumerate(hooks):
        if i in existing:
            ids.append(existing[i])
            continue
        delivery = WebhookDelivery(
            # The row keeps the masked URL; the real one (it may carry a token) stays with the job's encrypted secrets.
            id=new_id("msg"), job_id=job.id, job_attempt=job.attempt, hook_index=i, url=mask_url(hook["url"]), event_type=event, payload=body,
            status=PENDING, attempts=0, next_attempt_at=now, created_at=now,
        )
        session.add(delivery)
        ids.append(delivery.id)
    session.flush()
    return ids


@dataclass(frozen=True)
class Claim:
    """What one send needs: claimed attempt number, URL, body and signing secret."""

    delivery_id: str
    attempt: int
    url: str
    payload: bytes
    secret: str | None


def get_delivery(session: Session, delivery_id: str, *, team_id: str | None = None) -> WebhookDelivery:
    """Return the delivery or raise NotFound (also for another team's when ``team_id`` is given)."""
    d = session.get(WebhookDelivery, delivery_id)
    if d is not None and team_id is not None and session.get(Job, d.job_id).team_id != team_id:
        d = None
    if d is None:
        raise NotFound(f"No webhook delivery with id {delivery_id!r}.", details={"resource": "webhook_delivery", "id": delivery_id})
    return d


def claim_attempt(session: Session, delivery: WebhookDelivery, now: datetime, *, force: bool = False) -> Claim | None:
    """Take the next attempt of a pending, due delivery; None if it is not ours to send.

    ``force`` ignores ``next_attempt_at`` (a replay). The attempt counter is the
    compare-and-set token: a concurrent claim of the same attempt gets None.
    """
    if delivery.status != PENDING:
        return None
    if not force and delivery.next_attempt_at is not None and delivery.next_attempt_at > now:
        return None
    seen = delivery.attempts
    res = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.status == PENDING, WebhookDelivery.attempts == seen)
        .values(attempts=seen + 1)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return None
    job = session.get(Job, delivery.job_id)
    secrets = (job.secrets or {}) if job is not None else {}
    hooks = ((job.spec or {}).get("webhooks") or []) if job is not None else []
    spec_url = hooks[delivery.hook_index]["url"] if delivery.hook_index < len(hooks) else delivery.url
    url = secrets.get(f"webhooks.{delivery.hook_index}.url") or spec_url  # jobs from before URLs were secrets
    return Claim(delivery.id, seen + 1, url, delivery.payload.encode("utf-8"), secrets.get(f"webhooks.{delivery.hook_index}.secret"))


def record_attempt(
    session: Session,
    delivery_id: str,
    *,
    status: str,
    at: datetime,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
    next_attempt_at: datetime | None,
) -> WebhookAttempt:
    """Log one attempt and move the delivery to ``status`` (pending, delivered, failed, disabled)."""
    attempt = WebhookAttempt(
        delivery_id=delivery_id, at=at, status_code=status_code, latency_ms=latency_ms,
        error=error[:2000] if error else None, next_attempt_at=next_attempt_at,
    )
    session.add(attempt)
    values: dict[str, Any] = {"status": status, "next_attempt_at": next_attempt_at}
    if status_code is not None:
        values["last_status_code"] = status_code
    if status == DELIVERED:
        values["delivered_at"] = at
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))
    session.flush()
    return attempt


def list_deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    """Return a job's deliveries (with their attempt logs), oldest first."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at, WebhookDelivery.hook_index)
    return list(session.scalars(stmt))


def due_deliveries(session: Session, now: datetime | None = None, limit: int = 100) -> list[str]:
    """Return ids of pending deliveries whose next attempt is due (for the sweeper)."""
    now = now or utcnow()
    stmt = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def replay(session: Session, delivery_id: str) -> WebhookDelivery:
    """Queue a delivery again with a fresh attempt budget; its log is kept.

    The same bytes go out under the same ``webhook-id``, so receivers can dedupe.
    Raises NotFound for an unknown id, InvalidState while it is still pending.
    """
    d = get_delivery(session, delivery_id)
    if d.status == PENDING:
        raise InvalidState(f"Webhook delivery {delivery_id} is still pending; it is sent on schedule.", details={"status": d.status})
    job = session.get(Job, d.job_id)
    if job is not None and job.purged_at is not None:  # storage.retention erased its URL and signing secret
        raise InvalidState(f"Webhook delivery {delivery_id} can no longer be replayed: its job's retry window ended and "
                           "the webhook's URL and signing secret were erased.", code="retry_window_passed", details={"status": d.status})
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(status=PENDING, attempts=0, next_attempt_at=utcnow())
    )
    session.flush()
    session.refresh(d)
    return d
