"""The webhook delivery log and replay, over rows written as the webhook worker writes them."""

from __future__ import annotations

from datetime import timedelta

from api.schemas import DeliveryList, DeliveryOut
from storage.models import WebhookAttempt, WebhookDelivery, new_id, utcnow
from tests.api.conftest import FULL, SECRETS


def _failed_delivery(db, job_id) -> str:
    """Record a delivery that failed twice and waits for its next try."""
    now = utcnow()
    did = new_id("whd")
    with db.session() as s:
        s.add(WebhookDelivery(
            id=did, job_id=job_id, hook_index=0, url="https://ci.example/hooks/quantfarm", event_type="job.failed",
            payload='{"type": "job.failed"}', status="failed", attempts=2, last_status_code=500,
            next_attempt_at=None, created_at=now - timedelta(minutes=5),
        ))
        s.flush()
        s.add(WebhookAttempt(delivery_id=did, at=now - timedelta(minutes=5), status_code=None, latency_ms=10.0, error="connection refused",
                             next_attempt_at=now - timedelta(minutes=4)))
        s.add(WebhookAttempt(delivery_id=did, at=now - timedelta(minutes=4), status_code=500, latency_ms=12.5, error=None, next_attempt_at=None))
    return did


def test_delivery_log_lists_every_attempt_in_order(client, db):
    job_id = client.post("/v1/jobs", json=FULL).get_json()["id"]
    did = _failed_delivery(db, job_id)
    resp = client.get(f"/v1/jobs/{job_id}/webhooks")
    assert resp.status_code == 200
    (d,) = DeliveryList.model_validate(resp.get_json()).items
    assert (d.id, d.status, d.attempts, d.last_status_code, d.event_type) == (did, "failed", 2, 500, "job.failed")
    assert [(a.status_code, a.error) for a in d.log] == [(None, "connection refused"), (500, None)]
    assert not any(secret.encode() in resp.data for secret in SECRETS)


def test_replay_makes_the_delivery_due_and_enqueues_it(client, db, dispatcher):
    job_id = client.post("/v1/jobs", json=FULL).get_json()["id"]
    did = _failed_delivery(db, job_id)
    before = utcnow()
    resp = client.post(f"/v1/webhook-deliveries/{did}/replay")
    assert resp.status_code == 202
    d = DeliveryOut.model_validate(resp.get_json())
    assert d.status == "pending" and len(d.log) == 2
    assert dispatcher.webhooks == [did]
    with db.session() as s:
        row = s.get(WebhookDelivery, did)
        assert row.status == "pending" and row.attempts == 0  # a fresh attempt budget
        assert len(row.attempt_log) == 2  # the log is kept
        assert before - timedelta(seconds=1) <= row.next_attempt_at <= utcnow()


def test_replay_with_the_broker_down_stays_pending(client, db, dispatcher):
    job_id = client.post("/v1/jobs", json=FULL).get_json()["id"]
    did = _failed_delivery(db, job_id)
    dispatcher.broker_up = False
    resp = client.post(f"/v1/webhook-deliveries/{did}/replay")
    assert resp.status_code == 202 and resp.get_json()["status"] == "pending"
    assert dispatcher.webhooks == []
    with db.session() as s:
        assert s.get(WebhookDelivery, did).status == "pending"


def test_replay_of_a_pending_delivery_is_409_and_an_unknown_one_404(client, db, dispatcher):
    job_id = client.post("/v1/jobs", json=FULL).get_json()["id"]
    did = _failed_delivery(db, job_id)
    assert client.post(f"/v1/webhook-deliveries/{did}/replay").status_code == 202
    again = client.post(f"/v1/webhook-deliveries/{did}/replay")
    assert again.status_code == 409 and again.get_json()["error"] == "invalid_state"
    assert "still pending" in again.get_json()["message"]
    assert dispatcher.webhooks == [did]  # the refused replay enqueued nothing
    missing = client.post("/v1/webhook-deliveries/whd_nope/replay")
    assert missing.status_code == 404 and missing.get_json()["error"] == "not_found"
    with db.session() as s:
        assert s.get(WebhookDelivery, did).status == "pending"
