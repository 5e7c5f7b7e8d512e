"""The task-set gate end to end: upload and submit through the API, run the job with the runner, same database and store.

The Hub stand-in (tests/support/hubserver.py) replaces the real Hub, which is unreachable here.
"""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import select

from quantfarm.settings import Settings
from storage.layout import stored_prefix
from storage.models import WebhookDelivery
from tests.api.conftest import RecordingDispatcher, make_app
from tests.workers.test_runner import CAL, env, load  # noqa: F401 (env: the fixture)
from workers.runner import JobRunner

MAX_NEW = 8


@pytest.fixture(scope="module")
def float_answers(tiny_llama):
    """The float model's own greedy answers: the 'before' score is 100%."""
    from tests.support.models import greedy_tasks

    tasks = greedy_tasks(tiny_llama, MAX_NEW)
    assert len(tasks) >= 5
    return tasks


def _api(db, store, tmp_path):
    app = make_app(db, store, RecordingDispatcher(db), tmp_path)
    return app.test_client()


def _task_set(client, tasks) -> str:
    data = "\n".join(json.dumps(t) for t in tasks).encode()
    resp = client.post("/v1/uploads", data={"file": (io.BytesIO(data), "tasks.jsonl")}, content_type="multipart/form-data")
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def test_a_task_gate_no_model_can_clear_fails_the_job_keeps_the_artifact_and_publishes_nothing(env, tiny_llama, float_answers, tmp_path):
    """Before is 100% (the answers are the float model's), so 'rise by 10 points' cannot be met."""
    from tests.support.hubserver import HubServer

    _, db, store = env
    client = _api(db, store, tmp_path)
    upload_id = _task_set(client, float_answers)
    with HubServer() as hub:
        hub.add_token("hf_write_tasks", write=True)
        settings = Settings(home=tmp_path / "home", lease_seconds=30, hf_endpoint=hub.endpoint, webhook_allow_private=True)
        resp = client.post("/v1/jobs", json={
            "model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32},
            "calibration": CAL, "evaluate": False,
            "gate": {"task_set_upload_id": upload_id, "max_exact_match_drop_pct": -10, "max_new_tokens": MAX_NEW},
            "destination": {"store": False, "hub": {"repo_id": "team/tasks", "token": "hf_write_tasks"}},
            "webhooks": [{"url": "http://127.0.0.1:9/hook"}],
        })
        assert resp.status_code == 201, resp.get_json()
        job_id = resp.get_json()["id"]
        assert JobRunner(settings, db, store).run(job_id) == "failed"
        assert hub.uploads == [] and hub.created == [] and "team/tasks" not in hub.repos
    job, events, (art,) = load(db, job_id)
    assert (job.status, job.error_code) == ("failed", "quality_gate")
    m = job.metrics
    assert m["task_count"] == len(float_answers) and m["task_exact_match_before"] == 1.0
    assert "perplexity_before" not in m  # evaluate: false; the task set ran on its own
    gate = m["gate"]
    assert gate["passed"] is False and gate["exact_match_before"] == 1.0 and gate["max_exact_match_drop_pct"] == -10
    assert gate["exact_match_drop_pct"] == round((1.0 - m["task_exact_match_after"]) * 100, 4)
    assert "exact match 100.00%" in job.error_message and "not published" in job.error_message
    assert art.kind == "gate_failed" and art.hub_url is None and art.location is not None
    card = store.get_bytes(f"{stored_prefix(art)}/README.md").decode()
    assert "| task_exact_match_before | 1.0000 |" in card and f"| task_count | {len(float_answers)} |" in card
    assert "evaluating" in [e.stage for e in events if e.kind == "stage"]
    with db.session() as s:  # the webhook carries the numbers
        (payload,) = s.scalars(select(WebhookDelivery.payload).where(WebhookDelivery.job_id == job_id))
    data = json.loads(payload)["data"]
    assert data["error"]["code"] == "quality_gate" and data["metrics"]["gate"] == gate
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="task-scores"' in page and "100.0%" in page and "Quality gate <strong>failed</strong>" in page


def test_a_lenient_task_gate_passes(env, tiny_llama, float_answers, tmp_path):
    _, db, store = env
    client = _api(db, store, tmp_path)
    upload_id = _task_set(client, float_answers)
    resp = client.post("/v1/jobs", json={
        "model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32},
        "calibration": CAL, "evaluation": {"max_windows": 2},
        "gate": {"task_set_upload_id": upload_id, "min_exact_match": 0, "max_ppl_increase_pct": 1000, "max_new_tokens": MAX_NEW},
    })
    job_id = resp.get_json()["id"]
    assert JobRunner(Settings(home=tmp_path / "home", lease_seconds=30), db, store).run(job_id) == "succeeded"
    job, events, (art,) = load(db, job_id)
    gate = job.metrics["gate"]
    assert gate["passed"] is True and art.kind == "model"
    assert [e.stage for e in events if e.kind == "stage"].count("evaluating") == 1  # perplexity and tasks: one stage
    assert gate["exact_match_before"] == 1.0 and gate["min_exact_match"] == 0 and gate["ppl_increase_pct"] is not None
