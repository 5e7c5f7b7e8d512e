"""Webhook deliveries end to end: real HTTP to a loopback receiver, real PostgreSQL and SQLite.

The receiver (tests/support/receiver.py) checks every signature with the
``standardwebhooks`` package from PyPI. Loopback is private, so these tests
turn ``webhook_allow_private`` on, except the SSRF tests, which check that it is
refused when off. The DNS-rebinding tests fake the resolver in-process, since no
DNS server can be controlled here; the connection they make is still real.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from quantfarm.errors import InvalidState
from quantfarm.settings import Settings
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from storage import jobs
from storage import webhooks as wstore
from storage.jobs import JobStatus
from storage.models import WebhookAttempt, WebhookDelivery
from storage.views import delivery_view, job_view
from tests.support.receiver import Receiver, Reply
from workers.webhooks import WebhookSender, parse_retry_after, sign

HF_TOKEN = "hf_TESTTOKENnever_log_me_0123456789"


@pytest.fixture
def secret():
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def make_settings(tmp_path, **kw) -> Settings:
    base = dict(home=tmp_path / "home", webhook_allow_private=True, webhook_timeout=1.0, webhook_max_attempts=3,
                webhook_backoff_base=0.0, webhook_backoff_max=600.0)
    return Settings(**{**base, **kw})


def ended_job(db, hooks, status=JobStatus.SUCCEEDED) -> tuple[str, list[str]]:
    """Create a job with ``hooks``, end it in ``status`` and create its deliveries."""
    spec = parse_spec({"model": {"source": "hub", "repo_id": "org/tiny", "token": HF_TOKEN}, "method": "rtn", "webhooks": hooks})
    with db.session() as s:
        job_id = jobs.create_job(s, method="rtn", model_ref="org/tiny", spec=public_spec(spec), secrets=spec_secrets(spec)).id
    with db.session() as s:
        job = jobs.claim(s, job_id, "w1", 30)
        extra = {"error_code": "calibration_error", "error_message": "bad data"} if status == JobStatus.FAILED else {}
        jobs.transition(s, job, status, owner="w1", stage=None, **extra)  # the terminal move creates the deliveries
        ids = [d.id for d in wstore.list_deliveries(s, job_id)]
    return job_id, ids


def attempts_of(db, delivery_id) -> tuple[WebhookDelivery, list[WebhookAttempt]]:
    with db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        log = list(s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)))
        return d, log


# --- signing -----------------------------------------------------------------------------


def test_signature_matches_the_reference_implementation(secret):
    from standardwebhooks.webhooks import Webhook

    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1", "note": "ünïcode"}}, ensure_ascii=False).encode()
    ts = int(datetime.now(timezone.utc).timestamp())
    ours = sign(secret, "msg_1", ts, body)
    ref = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, tz=timezone.utc), body.decode())
    assert ours == ref and ours.startswith("v1,")
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": ours}
    assert Webhook(secret).verify(body, headers)["data"]["id"] == "job_1"
    # The prefix is optional and unpadded base64 is accepted, as in the reference.
    assert sign(secret.removeprefix("whsec_").rstrip("="), "msg_1", ts, body) == ours


def test_retry_after_parses_seconds_and_http_dates():
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Tue, 01 Jan 2030 12:05:00 GMT", now) == 300.0
    assert parse_retry_after("Tue, 01 Jan 2030 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


# --- creating deliveries ---------------------------------------------------------------------


def test_deliveries_are_created_once_with_a_standard_payload(db, secret):
    hooks = [{"url": "http://127.0.0.1:9/a", "secret": secret}, {"url": "http://127.0.0.1:9/b"}]
    job_id, ids = ended_job(db, hooks, JobStatus.FAILED)
    assert len(ids) == 2 and len(set(ids)) == 2
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        again = wstore.create_deliveries(s, job, job_view(job))
        rows = wstore.list_deliveries(s, job_id)
    assert again == ids  # idempotent: same rows, same webhook-ids
    assert [(r.hook_index, r.url, r.event_type, r.status, r.attempts) for r in rows] == [
        (0, "http://127.0.0.1:9/***", "job.failed", "pending", 0),  # the row keeps the masked URL
        (1, "http://127.0.0.1:9/***", "job.failed", "pending", 0),
    ]
    body = json.loads(rows[0].payload)
    assert set(body) == {"type", "timestamp", "data"} and body["type"] == "job.failed"
    assert body["data"]["id"] == job_id and body["data"]["status"] == "failed"
    assert body["data"]["error"] == {"code": "calibration_error", "message": "bad data"}
    assert body["timestamp"].endswith("Z") and rows[0].payload == rows[1].payload
    assert secret not in rows[0].payload and HF_TOKEN not in rows[0].payload


def test_no_deliveries_for_a_running_job_or_a_leaking_payload(db, secret):
    spec = parse_spec({"model": {"source": "local", "path": "/m"}, "method": "rtn", "webhooks": [{"url": "http://127.0.0.1:9/", "secret": secret}]})
    with db.session() as s:
        job = jobs.create_job(s, method="rtn", model_ref="m", spec=public_spec(spec), secrets=spec_secrets(spec))
        with pytest.raises(InvalidState, match="only ended jobs notify"):
            wstore.create_deliveries(s, job, job_view(job))
        job_id = job.id
    with db.session() as s:
        job = jobs.claim(s, job_id, "w1", 30)
        jobs.transition(s, job, JobStatus.SUCCEEDED, owner="w1")
        (made,) = wstore.list_deliveries(s, job.id)  # made by the terminal transition itself
        assert secret not in made.payload
        assert wstore.create_deliveries(s, job, job_view(job)) == [made.id]
        assert [d.id for d in wstore.list_deliveries(s, job.id)] == [made.id]


def test_a_secret_pasted_into_a_label_is_cut_out_and_the_job_still_ends(db, secret, caplog):
    caplog.set_level(logging.DEBUG)
    spec = parse_spec({
        "model": {"source": "hub", "repo_id": "org/tiny", "token": HF_TOKEN}, "method": "rtn",
        "labels": {"note": f"token is {HF_TOKEN}", HF_TOKEN: "as a key too"},
        "webhooks": [{"url": "http://127.0.0.1:9/", "secret": secret}],
    })
    with db.session() as s:
        job = jobs.create_job(s, method="rtn", model_ref="m", spec=public_spec(spec), secrets=spec_secrets(spec))
        job_id = job.id
    with db.session() as s:
        job = jobs.claim(s, job_id, "w1", 30)
        jobs.transition(s, job, JobStatus.SUCCEEDED, owner="w1")  # used to raise and leave the job running
    with db.session() as s:
        assert jobs.get_job(s, job_id).status == JobStatus.SUCCEEDED
        (made,) = wstore.list_deliveries(s, job_id)
    assert HF_TOKEN not in made.payload and secret not in made.payload
    labels = json.loads(made.payload)["data"]["labels"]
    assert labels == {"note": "token is [redacted]", "[redacted]": "as a key too"}
    assert HF_TOKEN not in caplog.text
    assert "model.token" in caplog.text or "token" in caplog.text  # the warning names the secret, not its value


# --- delivering ---------------------------------------------------------------------------------


def test_500_then_200_is_retried_then_delivered_once(db, tmp_path, secret):
    with Receiver(secret, [Reply(500, body=b"boom")]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path))
        first = sender.deliver(did)
        assert (first.status, first.sent, first.attempt, first.status_code, first.retry) == ("pending", True, 1, 500, True)
        assert first.error == "HTTP 500: boom" and first.retry_in == 0.0
        second = sender.deliver(did)
        assert (second.status, second.attempt, second.status_code, second.retry) == ("delivered", 2, 200, False)
        third = sender.deliver(did)  # a duplicate task message after success
        assert (third.status, third.sent, third.retry) == ("delivered", False, False)

    assert len(rx.received) == 2 and all(r.verified for r in rx.received), [r.error for r in rx.received]
    a, b = rx.received
    assert a.body == b.body and a.headers["webhook-id"] == b.headers["webhook-id"] == did
    assert a.headers["content-type"] == "application/json"
    assert a.payload["type"] == "job.succeeded" and a.payload["data"]["status"] == "succeeded"
    d, log = attempts_of(db, did)
    assert (d.status, d.attempts, d.last_status_code, d.next_attempt_at) == ("delivered", 2, 200, None)
    assert d.delivered_at == log[1].at
    assert [(x.status_code, x.error) for x in log] == [(500, "HTTP 500: boom"), (200, None)]
    assert all(isinstance(x.latency_ms, float) and x.latency_ms > 0 for x in log)
    assert log[0].next_attempt_at == log[0].at and log[1].next_attempt_at is None
    with db.session() as s:
        view = delivery_view(wstore.get_delivery(s, did))
    assert [e["status_code"] for e in view["log"]] == [500, 200] and view["status"] == "delivered"


def test_timeout_is_retried(db, tmp_path, secret):
    with Receiver(secret, [Reply(200, delay=2.0)]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path, webhook_timeout=0.5))
        first = sender.deliver(did)
        assert (first.status, first.status_code, first.error, first.retry) == ("pending", None, "timed out after 0.5s", True)
        assert sender.deliver(did).status == "delivered"
    _, log = attempts_of(db, did)
    assert [(x.status_code, x.error) for x in log] == [(None, "timed out after 0.5s"), (200, None)]


def test_a_trickling_receiver_is_cut_at_the_total_deadline(db, tmp_path, secret):
    """A byte a second never trips a per-read timeout; the attempt still ends at the deadline."""
    import time

    with Receiver(secret, [Reply(200, trickle=1.0, body=b"x" * 50)]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path, webhook_timeout=2.0))
        started = time.monotonic()
        first = sender.deliver(did)
        took = time.monotonic() - started
        assert (first.status, first.status_code, first.error, first.retry) == ("pending", None, "timed out after 2s", True)
        assert 2.0 <= took < 3.5, took
        assert sender.deliver(did).status == "delivered"  # the next attempt gets a plain answer
    _, log = attempts_of(db, did)
    assert [(x.status_code, x.error) for x in log] == [(None, "timed out after 2s"), (200, None)]
    assert 2000 <= log[0].latency_ms < 3500


def test_410_disables_with_no_further_attempts(db, tmp_path, secret):
    with Receiver(secret, [Reply(410)]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}], JobStatus.CANCELLED)
        sender = WebhookSender(db, make_settings(tmp_path))
        out = sender.deliver(did)
        assert (out.status, out.status_code, out.retry) == ("disabled", 410, False)
        assert sender.deliver(did).sent is False
    assert len(rx.received) == 1 and rx.received[0].payload["type"] == "job.cancelled"
    d, log = attempts_of(db, did)
    assert (d.status, d.attempts, [x.status_code for x in log]) == ("disabled", 1, [410])


def test_gives_up_after_max_attempts(db, tmp_path, secret):
    with Receiver(secret, [Reply(500), Reply(502), Reply(404)]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path, webhook_max_attempts=3))
        outs = [sender.deliver(did) for _ in range(4)]
    assert [(o.status, o.sent, o.retry) for o in outs] == [
        ("pending", True, True), ("pending", True, True), ("failed", True, False), ("failed", False, False),
    ]
    d, log = attempts_of(db, did)
    assert (d.status, [x.status_code for x in log], log[-1].next_attempt_at) == ("failed", [500, 502, 404], None)
    assert len(rx.received) == 3


def test_retry_after_is_honoured_and_early_calls_send_nothing(db, tmp_path, secret):
    with Receiver(secret, [Reply(503, headers={"Retry-After": "120"})]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path, webhook_backoff_base=1.0))
        out = sender.deliver(did)
        assert out.retry_in == 120.0
        early = sender.deliver(did)  # e.g. a duplicate message: not due, and it does not re-arm
        assert (early.sent, early.retry, early.status) == (False, False, "pending")
        assert len(rx.received) == 1
        forced = sender.deliver(did, force=True)
        assert forced.status == "delivered"
    _, log = attempts_of(db, did)
    assert log[0].next_attempt_at - log[0].at == timedelta(seconds=120)


def test_backoff_is_exponential_with_full_jitter(db, tmp_path, secret):
    with Receiver(secret, [Reply(500), Reply(500)]) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        settings = make_settings(tmp_path, webhook_backoff_base=10.0, webhook_max_attempts=5)
        sender = WebhookSender(db, settings, rng=random.Random(7))
        first = sender.deliver(did)
        second = sender.deliver(did, force=True)
    expect = random.Random(7)
    assert first.retry_in == pytest.approx(expect.uniform(0, 10.0), abs=1e-3)
    assert second.retry_in == pytest.approx(expect.uniform(0, 20.0), abs=1e-3)


def test_unsigned_hook_and_concurrent_claims(db, tmp_path):
    with Receiver(None) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url}])
        with db.session() as a, db.session() as b:
            da, db_ = a.get(WebhookDelivery, did), b.get(WebhookDelivery, did)
            now = datetime.now(timezone.utc)
            assert wstore.claim_attempt(a, da, now).attempt == 1
            a.commit()
            assert wstore.claim_attempt(b, db_, now) is None  # attempt 1 is taken
        out = WebhookSender(db, make_settings(tmp_path)).deliver(did)
    assert out.status == "delivered" and out.attempt == 2
    (got,) = rx.received
    assert "webhook-signature" not in got.headers and got.headers["webhook-id"] == did


def test_a_secret_that_cannot_sign_is_refused_at_submit_and_at_send(db, tmp_path, secret):
    from quantfarm.errors import ValidationFailed
    from storage.models import Job

    with pytest.raises(ValidationFailed) as err:
        parse_spec({"model": {"source": "local", "path": "/m"}, "method": "rtn", "webhooks": [{"url": "http://x.test/", "secret": "whsec_"}]})
    assert err.value.fields == {"webhooks.0.secret": "the webhook secret is empty"}
    with Receiver(None) as rx:
        job_id, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        with db.session() as s:  # a row written before the submit check existed
            s.get(Job, job_id).secrets = {"webhooks.0.secret": "whsec_"}
        out = WebhookSender(db, make_settings(tmp_path)).deliver(did)
    assert (out.status, out.sent, out.retry, out.error) == ("failed", False, False, "cannot sign: the webhook secret is empty")
    assert rx.received == []


def test_replay_resends_the_same_message(db, tmp_path, secret):
    with Receiver(secret) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path))
        assert sender.deliver(did).status == "delivered"
        with db.session() as s:
            d = wstore.replay(s, did)
            assert (d.status, d.attempts) == ("pending", 0)
            assert wstore.due_deliveries(s) == [did]
            with pytest.raises(InvalidState, match="still pending"):
                wstore.replay(s, did)
        assert sender.deliver(did).status == "delivered"
    assert [r.headers["webhook-id"] for r in rx.received] == [did, did]
    assert rx.received[0].body == rx.received[1].body and all(r.verified for r in rx.received)
    with db.session() as s:
        assert wstore.due_deliveries(s) == []


def test_no_secret_in_logs_or_rows(db, tmp_path, secret, caplog):
    caplog.set_level(logging.DEBUG)
    with Receiver(secret, [Reply(500), Reply(200)]) as rx:
        url = rx.url + "?access_token=urlsecret123"
        job_id, (did,) = ended_job(db, [{"url": url, "secret": secret}])
        sender = WebhookSender(db, make_settings(tmp_path))
        sender.deliver(did)
        sender.deliver(did)
    assert [r.verified for r in rx.received] == [True, True]
    raw_key = secret.removeprefix("whsec_")
    with db.session() as s:
        rows = [json.dumps(delivery_view(d), default=str) + d.payload for d in wstore.list_deliveries(s, job_id)]
        rows += [repr(a.__dict__) for a in s.scalars(select(WebhookAttempt))]
    dumped = "\n".join(rows)
    for needle in (secret, raw_key, HF_TOKEN):
        assert needle not in caplog.text and needle not in dumped
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("workers."))
    assert "urlsecret123" not in ours  # our log lines drop a URL's query and user info
    assert f"webhook delivery {did} attempt 2" in caplog.text
