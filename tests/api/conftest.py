"""Fixtures for the API tests: the app on a real database, a temporary LocalStore, a recording dispatcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import test_keyring
from sqlalchemy import func, select

from api.app import create_app
from quantfarm.settings import Settings
from storage.artifacts import LocalStore
from storage.models import Job, JobEvent

MINIMAL = {"model": {"source": "local", "path": "/models/tiny-llama"}, "method": "gptq"}

MODEL_TOKEN = "hf_modeltoken_SECRET_one"
HUB_TOKEN = "hf_hubtoken_SECRET_two"
HOOK_SECRET = "whsec_c2VjcmV0LVNFQ1JFVC10aHJlZQ=="
SECRETS = (MODEL_TOKEN, HUB_TOKEN, HOOK_SECRET)

FULL = {
    "model": {"source": "hub", "repo_id": "org/name", "revision": "v1", "token": MODEL_TOKEN},
    "method": "gptq",
    "options": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "damp_percent": 0.01},
    "calibration": {"dataset": "builtin:code", "num_samples": 16, "seq_len": 64},
    "destination": {"store": True, "hub": {"repo_id": "team/name-gptq-4bit", "private": True, "token": HUB_TOKEN}},
    "evaluate": True,
    "webhooks": [{"url": "https://ci.example/hooks/quantfarm", "secret": HOOK_SECRET}],
    "priority": 1,
    "labels": {"team": "nlp"},
}


class RecordingDispatcher:
    """Records what the API would send to the broker, and whether the job row was committed by then.

    An in-process stand-in: the broker itself is exercised for real by
    tests/api/test_dispatch_redis.py (Redis) and by the end-to-end tests (tests/e2e),
    which run real Celery workers. ``broker_up=False`` makes every call fail like a
    down broker would.
    """

    def __init__(self, db=None, broker_up: bool = True):
        self.db = db
        self.broker_up = broker_up
        self.jobs: list[str] = []
        self.webhooks: list[str] = []
        self.committed_at_enqueue: list[bool] = []

    def _check(self):
        if not self.broker_up:
            raise ConnectionRefusedError("broker down")

    def run_job(self, job_id: str) -> None:
        self._check()
        if self.db is not None:  # a separate session sees only committed rows
            with self.db.session() as s:
                self.committed_at_enqueue.append(s.get(Job, job_id) is not None)
        self.jobs.append(job_id)

    def deliver_webhook(self, delivery_id: str, countdown: float = 0) -> None:
        self._check()
        self.webhooks.append(delivery_id)

    def ping(self) -> bool:
        self._check()
        return True


def woken_at_submit(db, job_ids: list[str]) -> list[str]:
    """The broker wake-ups a submit of ``job_ids`` sends: none on PostgreSQL, whose insert announces the jobs itself
    (storage/notices.py); one each elsewhere."""
    from storage.notices import announces_new_jobs

    return [] if announces_new_jobs(db) else list(job_ids)


def make_app(db, store, dispatcher, tmp_path, **settings):
    # The bodies' webhook hosts (ci.example) do not resolve offline; the SSRF guard has its own tests.
    settings.setdefault("webhook_allow_private", True)
    # No worker runs these apps' jobs, and their bodies name made-up folders (/m, /models/...): any absolute
    # path passes the submit-side root check here. tests/api/test_local_roots.py checks it with real roots.
    settings.setdefault("local_roots", [Path("/")])
    app = create_app(Settings(home=tmp_path / "home", **settings), db=db, dispatcher=dispatcher, store=store)
    app.config["TESTING"] = True
    return app


def counts(db) -> tuple[int, int]:
    """Return (jobs, job_events) row counts."""
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(JobEvent))


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def dispatcher(db):
    return RecordingDispatcher(db)


@pytest.fixture
def app(db, store, dispatcher, tmp_path):
    return make_app(db, store, dispatcher, tmp_path)


@pytest.fixture
def lite(sqlite_url, store, tmp_path):
    """The app on SQLite only, for checks that do not depend on the database engine."""
    from storage.db import Database

    db = Database(sqlite_url, keyring=test_keyring())
    yield make_app(db, store, RecordingDispatcher(db), tmp_path)
    db.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def submit(client):
    """POST a job (MINIMAL merged with overrides) and return the created job object."""

    def _submit(**overrides):
        resp = client.post("/v1/jobs", json={**MINIMAL, **overrides})
        assert resp.status_code == 201, resp.get_json()
        return resp.get_json()

    return _submit
