"""The gate's task set at submit: a good one is accepted; every bad one is a clear 422 and nothing is created."""

from __future__ import annotations

import io
import json

import pytest

from api.app import create_app
from quantfarm import taskset
from quantfarm.settings import Settings
from storage import teams as team_store
from tests.api.conftest import MINIMAL, RecordingDispatcher, counts, woken_at_submit

GOOD = b'{"prompt": "2 + 2 =", "answer": "4"}\n\n{"prompt": "The capital of France is", "answer": "Paris"}\n'
FIELD = "gate.task_set_upload_id"


def _upload(client, data: bytes, headers=None) -> str:
    resp = client.post("/v1/uploads", data={"file": (io.BytesIO(data), "tasks.jsonl")}, content_type="multipart/form-data",
                       headers=headers or {})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def _body(gate: dict, **extra) -> dict:
    return {**MINIMAL, "gate": gate, **extra}


def test_a_good_task_set_is_accepted(client, db, dispatcher):
    upload_id = _upload(client, GOOD)
    resp = client.post("/v1/jobs", json=_body({"task_set_upload_id": upload_id, "min_exact_match": 0.5}, evaluate=False))
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["spec"]["gate"] == {"task_set_upload_id": upload_id, "min_exact_match": 0.5}
    assert dispatcher.jobs == woken_at_submit(db, [resp.get_json()["id"]])


@pytest.mark.parametrize("data,why", [
    (b'{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', "line 2 is not JSON"),
    (b'["a", "b"]\n', "line 1 is not a JSON object"),
    (b'{"prompt": "a"}\n', "line 1 needs a non-empty string 'answer'"),
    (b'{"prompt": "a", "answer": 4}\n', "line 1 needs a non-empty string 'answer'"),
    (b'{"prompt": "  ", "answer": "4"}\n', "line 1 needs a non-empty string 'prompt'"),
    (b'{"prompt": "a", "answer": "b", "label": "x"}\n', "line 1 has unknown keys label"),
    (b"\n\n  \n", "the file holds no tasks"),
    (json.dumps({"prompt": "p" * (taskset.MAX_PROMPT_CHARS + 1), "answer": "b"}).encode(), "prompt is 4001 characters"),
    (b'{"prompt": "a", "answer": "b"}\n' * (taskset.MAX_TASKS + 1), f"more than {taskset.MAX_TASKS} tasks"),
    (b'{"prompt": "a", "answer": "b"}\n' * 40_000, "a task set holds at most 1048576 bytes"),
])
def test_bad_task_sets_are_422_at_submit(client, db, dispatcher, data, why):
    upload_id = _upload(client, data)
    before = counts(db)
    resp = client.post("/v1/jobs", json=_body({"task_set_upload_id": upload_id, "min_exact_match": 0.5}))
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "validation_error" and list(body["details"]["fields"]) == [FIELD]
    assert why in body["details"]["fields"][FIELD]
    assert counts(db) == before and dispatcher.jobs == []


@pytest.mark.parametrize("gate,why", [
    ({"min_exact_match": 0.5}, "need a task_set_upload_id"),
    ({"task_set_upload_id": "upl_x"}, "needs min_exact_match or max_exact_match_drop_pct"),
    ({"max_ppl_increase_pct": 5, "max_new_tokens": 8}, "max_new_tokens applies to a task_set_upload_id only"),
    ({}, "set max_ppl_increase_pct, or a task_set_upload_id"),
    ({"task_set_upload_id": "upl_x", "min_exact_match": 1.5}, "less than or equal to 1"),
    ({"task_set_upload_id": "upl_x", "max_exact_match_drop_pct": 5, "max_new_tokens": 1000}, "less than or equal to 128"),
])
def test_incoherent_gates_are_422(client, db, dispatcher, gate, why):
    before = counts(db)
    resp = client.post("/v1/jobs", json=_body(gate))
    assert resp.status_code == 422
    assert any(why in v for v in resp.get_json()["details"]["fields"].values()), resp.get_json()
    assert counts(db) == before and dispatcher.jobs == []


def test_a_perplexity_bar_needs_evaluation_but_a_task_bar_does_not(client, db):
    resp = client.post("/v1/jobs", json=_body({"max_ppl_increase_pct": 5}, evaluate=False))
    assert resp.status_code == 422 and "needs evaluate: true" in json.dumps(resp.get_json())


def test_unknown_and_other_teams_task_sets_are_refused_alike(db, store, tmp_path):
    app = create_app(Settings(home=tmp_path / "home", auth="on", auth_cache_seconds=0, local_roots=[tmp_path]),
                     db=db, dispatcher=RecordingDispatcher(db), store=store)
    with db.session() as s:
        a, b = team_store.create_team(s, "team-a"), team_store.create_team(s, "team-b")
        key_a = team_store.create_key(s, a.id, role="member", name="a").key
        key_b = team_store.create_key(s, b.id, role="member", name="b").key
    client = app.test_client()
    theirs = _upload(client, GOOD, {"Authorization": f"Bearer {key_b}"})
    before = counts(db)
    answers = []
    for upload_id in (theirs, "upl_01jzzzzzzzzzzzzzzzzzzzzzzz", "../../etc/passwd"):
        resp = client.post("/v1/jobs", headers={"Authorization": f"Bearer {key_a}"}, json={
            "model": {"source": "local", "path": str(tmp_path)}, "method": "rtn",
            "gate": {"task_set_upload_id": upload_id, "min_exact_match": 0.5}})
        assert resp.status_code == 422
        answers.append(resp.get_json()["details"]["fields"])
    assert answers[0] == answers[1] == answers[2] == {FIELD: "no upload with this id; upload the task set with POST /v1/uploads first"}
    assert counts(db) == before
