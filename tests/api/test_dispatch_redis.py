"""The API's enqueue against the real Redis on this machine (db 15, a queue of its own)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from tests.conftest import test_keyring
import redis

from api.schemas import Health
from quantfarm.queue import RUN_JOB, Dispatcher
from quantfarm.settings import Settings
from storage.db import Database
from tests.api.conftest import MINIMAL, make_app

REDIS = "redis://127.0.0.1:6379/15"


@pytest.fixture
def queue():
    name = f"qf-test-{uuid.uuid4().hex[:10]}"
    r = redis.Redis.from_url(REDIS)
    yield r, name
    for key in r.scan_iter(f"*{name}*"):
        r.delete(key)
    r.close()


def test_submitted_job_lands_in_the_redis_queue(sqlite_url, store, tmp_path, queue):
    r, name = queue
    db = Database(sqlite_url, keyring=test_keyring())
    dispatcher = Dispatcher(Settings(home=tmp_path / "home", broker_url=REDIS, queue=name))
    client = make_app(db, store, dispatcher, tmp_path).test_client()

    assert Health.model_validate(client.get("/healthz").get_json()).broker == "ok"
    job_id = client.post("/v1/jobs", json=MINIMAL).get_json()["id"]

    raw = r.lrange(name, 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == RUN_JOB
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([job_id], {})
    db.dispose()
