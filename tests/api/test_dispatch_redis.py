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


def test_the_wake_up_is_the_message_celery_would_send(tmp_path, queue):
    """RedisWakeups pushes, field for field, what Celery's own send_task pushes (only the fresh ids differ)."""
    r, name = queue
    dispatcher = Dispatcher(Settings(home=tmp_path / "home", broker_url=REDIS, queue=name))
    assert dispatcher.wakeups is not None
    dispatcher.app.send_task(RUN_JOB, args=["job_a"])  # Celery's way
    dispatcher.run_job("job_a")  # ours
    ours, celerys = (json.loads(m) for m in r.lrange(name, 0, -1))  # LPUSH: the newest first

    fresh = {("headers", "id"), ("headers", "root_id"), ("properties", "correlation_id"), ("properties", "delivery_tag"),
             ("properties", "reply_to")}
    for part in ("headers", "properties"):
        assert list(ours[part]) == list(celerys[part]), part
        assert {k: v for k, v in ours[part].items() if (part, k) not in fresh} == \
            {k: v for k, v in celerys[part].items() if (part, k) not in fresh}, part
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    assert ours["headers"]["id"] != celerys["headers"]["id"]
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties")} == \
        {k: v for k, v in celerys.items() if k not in ("headers", "properties")}  # body, content type and encoding


def test_the_wake_up_client_outlives_a_dropped_connection(tmp_path, queue):
    """A connection the server dropped (as a Redis restart does) costs a retry, not the wake-up: the kept
    connection, then the client's pooled one too."""
    r, name = queue
    dispatcher = Dispatcher(Settings(home=tmp_path / "home", broker_url=REDIS, queue=name))
    dispatcher.run_job("job_1")
    mine = dispatcher.wakeups.client_id()
    r.client_kill_filter(_id=mine)
    dispatcher.run_job("job_2")  # through the client, which connects
    pooled = dispatcher.wakeups.client.client_id()
    assert r.llen(name) == 2 and pooled != mine
    dispatcher.run_job("job_3")  # the kept connection again, made anew
    fresh = dispatcher.wakeups.client_id()
    assert fresh not in (mine, pooled)
    r.client_kill_filter(_id=fresh)
    r.client_kill_filter(_id=pooled)
    dispatcher.run_job("job_4")  # both dropped: the client retries on a fresh connection
    assert [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in r.lrange(name, 0, -1)] == \
        ["job_4", "job_3", "job_2", "job_1"]


@pytest.mark.parametrize("args", [["job_01jabcdefghijklmnopqrstuvw"], ['job_"\\é\u2028\U0001f600'], [1, None, {"a": [1.5, -0.0]}], []])
def test_the_wake_up_bytes_are_the_envelopes_json(args, monkeypatch):
    """``message`` builds the envelope's text from parts encoded once a task name and process: the very bytes
    ``json.dumps`` writes of the envelope (with the message's own ids), for any args; a forked child (another pid)
    names itself in the origin."""
    import os

    from quantfarm import queue as queue_module
    from quantfarm.queue import RedisWakeups

    wakeups = RedisWakeups("redis://127.0.0.1:1/0", "qf-some-queue")  # never connects here
    for pid in (os.getpid(), os.getpid() + 1):
        monkeypatch.setattr(queue_module.os, "getpid", lambda pid=pid: pid)
        seen = set()
        for _ in range(3):
            raw = wakeups.message(RUN_JOB, args)
            got = json.loads(raw)
            task_id, tag = got["headers"]["id"], got["properties"]["delivery_tag"]
            assert raw == json.dumps(wakeups.envelope(RUN_JOB, args, task_id, tag, pid)).encode()
            assert uuid.UUID(task_id).version == uuid.UUID(tag).version == 4 and task_id != tag
            assert got["headers"]["origin"].startswith(f"gen{pid}@")
            seen |= {task_id, tag}
        assert len(seen) == 6  # fresh ids every message
