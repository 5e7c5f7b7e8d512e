"""Slow webhook receivers must not stop the sweeper (the real service process, Redis and PostgreSQL).

Twelve deliveries go to a receiver that answers one byte a second. The service
worker (compose's ``service`` command: beat + 4 task threads) must hand them to
its delivery threads, keep sweeping (a job whose lease expired is requeued while
every delivery is still in flight) and end each attempt at the 2 s deadline.
"""

from __future__ import annotations

import base64
import os
import time

import pytest
from sqlalchemy import select

from quantfarm.queue import Dispatcher
from quantfarm.settings import Settings
from storage import jobs
from storage.db import Database
from storage.models import Job, WebhookAttempt
from tests.conftest import test_keyring
from tests.support.compose import ComposeStack
from tests.support.receiver import Receiver, Reply
from tests.workers.test_webhooks import ended_job

pytestmark = pytest.mark.slow

DELIVERIES = 12


def test_trickling_receivers_do_not_stop_sweeps(own_db, own_redis, tmp_path):
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    db = Database(own_db, keyring=test_keyring())
    with Receiver(secret, [Reply(200, trickle=1.0, body=b"x" * 50)] * DELIVERIES) as rx, ComposeStack(
        tmp_path, database_url=own_db, broker_url=own_redis.url, s3_url="http://127.0.0.1:9",
        QUANTFARM_STORE="local", QUANTFARM_WEBHOOK_TIMEOUT="2", QUANTFARM_WEBHOOK_ALLOW_PRIVATE="true",
    ) as stack:
        deliveries = [ended_job(db, [{"url": rx.url, "secret": secret}])[1][0] for _ in range(DELIVERIES)]
        with db.session() as s:  # a job whose worker vanished: its lease is already over
            lost = jobs.create_job(s, method="rtn", model_ref="org/tiny", spec={"model": {"source": "hub", "repo_id": "org/tiny"}, "method": "rtn"}, secrets={}).id
        with db.session() as s:
            jobs.claim(s, lost, "vanished-worker", 0.01)
        dispatcher = Dispatcher(Settings(broker_url=own_redis.url))
        for did in deliveries:  # queued ahead of the first sweep
            dispatcher.deliver_webhook(did)
        stack.start("service")

        deadline = time.monotonic() + 60
        while True:
            with db.session() as s:
                status = s.get(Job, lost).status
                attempts = s.scalar(select(WebhookAttempt.id).limit(1))
            if status == "queued":
                break
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.05)
        assert attempts is None, "the sweep waited for a delivery attempt to end"
        assert rx.in_flight > 4, rx.in_flight  # more at once than the service has task threads

        while True:  # each delivery's first attempt (a retry, answered at once, may follow it)
            with db.session() as s:
                log = list(s.scalars(select(WebhookAttempt).order_by(WebhookAttempt.id)))
            first = {}
            for a in log:
                first.setdefault(a.delivery_id, a)
            if len(first) == DELIVERIES:
                break
            assert time.monotonic() < deadline, (len(log), stack.logs())
            time.sleep(0.1)
        assert set(first) == set(deliveries)
        assert {(a.status_code, a.error) for a in first.values()} == {(None, "timed out after 2s")}
        assert all(2000 <= a.latency_ms < 4000 for a in first.values()), [a.latency_ms for a in first.values()]
    db.dispose()
