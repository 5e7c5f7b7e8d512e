"""Job endpoints on PostgreSQL and SQLite: create, get, list, events, cancel, retry, validation, secrets."""

from __future__ import annotations

import json
import logging

import pytest

from api.schemas import EventList, JobOut, JobPage
from storage import jobs as job_store
from storage.models import Job
from tests.api.conftest import FULL, MINIMAL, SECRETS, counts, woken_at_submit


def _run(db, job_id, owner="worker-1"):
    with db.session() as s:
        assert job_store.claim(s, job_id, owner, 60) is not None


def _finish(db, job_id, status, **changes):
    with db.session() as s:
        job_store.transition(s, job_store.get_job(s, job_id), status, **changes)


def test_create_returns_queued_job_and_enqueues_after_commit(client, db, dispatcher):
    resp = client.post("/v1/jobs", json=MINIMAL)
    assert resp.status_code == 201
    job = JobOut.model_validate(resp.get_json()).model_dump(mode="json")
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["attempt"], job["method"], job["model"]) == ("queued", 1, "gptq", "local:/models/tiny-llama")
    assert job["spec"]["options"] == {"bits": 4, "group_size": 128, "sym": True, "desc_act": True, "static_groups": True,
                                      "damp_percent": 0.01, "true_sequential": True,
                                      "moe_calibration": "all_experts", "min_expert_tokens": 64}
    assert job["progress"] is None and job["error"] is None and job["artifacts"] == []
    assert dispatcher.jobs == woken_at_submit(db, [job["id"]])
    assert all(dispatcher.committed_at_enqueue)

    got = client.get(f"/v1/jobs/{job['id']}")
    assert got.status_code == 200
    assert got.get_json()["id"] == job["id"] and got.get_json()["status"] == "queued"


@pytest.mark.parametrize("model, ref", [
    ({"source": "hub", "repo_id": "org/name", "revision": "v2"}, "hub:org/name@v2"),
    ({"source": "hub", "repo_id": "org/name"}, "hub:org/name@main"),
    ({"source": "s3", "uri": "s3://models/llama/"}, "s3://models/llama/"),
])
def test_model_ref_is_readable(submit, model, ref):
    assert submit(model=model)["model"] == ref


def test_list_pages_newest_first_with_cursor(client, submit):
    ids = [submit()["id"] for _ in range(5)]
    pages, cursor = [], None
    while True:
        resp = client.get("/v1/jobs", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200
        page = JobPage.model_validate(resp.get_json())
        pages.append([j.id for j in page.items])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]


def test_list_filters_by_status(client, submit):
    keep, cancel = submit()["id"], submit()["id"]
    assert client.post(f"/v1/jobs/{cancel}/cancel").status_code == 202
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled").get_json()["items"]] == [cancel]
    assert [j["id"] for j in client.get("/v1/jobs?status=queued").get_json()["items"]] == [keep]


def test_list_rejects_bad_query(client):
    resp = client.get("/v1/jobs?status=bogus&limit=0&cursor=xyz")
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "validation_error"
    assert set(body["details"]["fields"]) == {"status", "limit", "cursor"}
    assert "queued" in body["details"]["fields"]["status"]
    assert client.get("/v1/jobs?limit=abc").get_json()["details"]["fields"] == {"limit": "must be an integer from 1 to 200"}
    assert client.get("/v1/jobs?limit=201").status_code == 422


def test_events_oldest_first(client, db, submit):
    job_id = submit()["id"]
    _run(db, job_id)
    with db.session() as s:
        job_store.set_stage(s, job_id, "worker-1", job_store.Stage.CALIBRATING)
        job_store.set_progress(s, job_id, "worker-1", done=1, total=2, eta=3.0)
    _finish(db, job_id, job_store.JobStatus.SUCCEEDED)
    resp = client.get(f"/v1/jobs/{job_id}/events")
    assert resp.status_code == 200
    items = EventList.model_validate(resp.get_json()).items
    assert [(e.kind, e.to_status, e.stage) for e in items] == [
        ("status", "queued", None), ("status", "running", None), ("stage", None, "calibrating"),
        ("progress", None, None), ("status", "succeeded", None),
    ]
    assert [e.id for e in items] == sorted(e.id for e in items)
    assert items[3].data == {"layers_done": 1, "layers_total": 2, "eta_seconds": 3.0}
    later = client.get(f"/v1/jobs/{job_id}/events?after={items[2].id}").get_json()["items"]
    assert [e["id"] for e in later] == [items[3].id, items[4].id]


def test_cancel_queued_cancels_at_once(client, db, submit):
    job_id = submit()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    assert resp.get_json()["status"] == "cancelled" and resp.get_json()["finished_at"]
    with db.session() as s:
        assert s.get(Job, job_id).status == "cancelled"


def test_cancel_running_requests_cancel(client, db, submit):
    job_id = submit()["id"]
    _run(db, job_id)
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    assert (resp.get_json()["status"], resp.get_json()["cancel_requested"]) == ("running", True)
    with db.session() as s:
        assert s.get(Job, job_id).cancel_requested is True


@pytest.mark.parametrize("status", [job_store.JobStatus.SUCCEEDED, job_store.JobStatus.FAILED])
def test_cancel_terminal_is_409(client, db, submit, status):
    job_id = submit()["id"]
    _run(db, job_id)
    _finish(db, job_id, status)
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 409
    assert resp.get_json()["error"] == "invalid_state"
    assert resp.get_json()["details"]["status"] == status.value
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == status.value


def test_retry_failed_queues_attempt_2_and_enqueues(client, db, dispatcher, submit):
    job_id = submit()["id"]
    _run(db, job_id)
    _finish(db, job_id, job_store.JobStatus.FAILED, error_code="not_a_model", error_message="No weights.")
    assert client.get(f"/v1/jobs/{job_id}").get_json()["error"] == {"code": "not_a_model", "message": "No weights."}
    resp = client.post(f"/v1/jobs/{job_id}/retry")
    assert resp.status_code == 202
    job = resp.get_json()
    assert (job["status"], job["attempt"], job["error"], job["finished_at"]) == ("queued", 2, None, None)
    assert dispatcher.jobs == [*woken_at_submit(db, [job_id]), job_id]  # a retry is woken by the broker everywhere
    assert all(dispatcher.committed_at_enqueue) and len(dispatcher.committed_at_enqueue) == len(dispatcher.jobs)


def test_retry_queued_is_409(client, db, dispatcher, submit):
    job_id = submit()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/retry")
    assert resp.status_code == 409 and resp.get_json()["error"] == "invalid_state"
    assert dispatcher.jobs == woken_at_submit(db, [job_id])


UNKNOWN = [
    ("get", "/v1/jobs/job_nope"), ("get", "/v1/jobs/job_nope/events"), ("get", "/v1/jobs/job_nope/artifacts"),
    ("get", "/v1/jobs/job_nope/webhooks"), ("post", "/v1/jobs/job_nope/cancel"), ("post", "/v1/jobs/job_nope/retry"),
    ("get", "/v1/artifacts/art_nope"), ("get", "/v1/artifacts/art_nope/files"), ("get", "/v1/artifacts/art_nope/files/config.json"),
    ("post", "/v1/webhook-deliveries/whd_nope/replay"), ("get", "/v1/uploads/upl_nope"),
]


def test_unknown_ids_are_404(client):
    for method, path in UNKNOWN:
        resp = getattr(client, method)(path)
        assert resp.status_code == 404, path
        body = resp.get_json()
        assert body["error"] == "not_found" and "nope" in body["message"], path


BAD_BODIES = [
    ('{"model": ', 400, "invalid_json", None),
    ("", 400, "invalid_json", None),
    (b"\xff\xfe\xfa", 400, "invalid_json", None),
    ("[1, 2]", 422, "validation_error", {"body": "must be a JSON object"}),
    (json.dumps({**MINIMAL, "method": "magic"}), 422, "validation_error", {"method"}),
    (json.dumps({**MINIMAL, "options": {"bits": 5}}), 422, "validation_error", {"options.bits"}),
    (json.dumps({**MINIMAL, "options": {"bits": 4, "wobble": True}}), 422, "validation_error", {"options.wobble": "unknown field"}),
    (json.dumps({"method": "gptq"}), 422, "validation_error", {"model": "field required"}),
    (json.dumps({**MINIMAL, "method": "gguf", "options": {"quant_type": "Q4_K_S"}}), 422, "validation_error", {"options.quant_type"}),
    (json.dumps({**MINIMAL, "method": "gguf", "options": {"imatrix": True}}), 422, "validation_error", {"options"}),
    (json.dumps({**MINIMAL, "model": {"source": "local", "path": "relative/dir"}}), 422, "validation_error", {"model.path"}),
    (json.dumps({**MINIMAL, "calibration": {"upload_id": "upl_00000000000000000000000000"}}), 422, "validation_error",
     {"calibration.upload_id"}),
    # Bodies that once reached past validation: a NUL that PostgreSQL's text columns refuse,
    # numbers JSON cannot carry, and nesting deep enough to blow the parser's stack.
    (json.dumps({**MINIMAL, "labels": {"team": "nl\x00p"}}), 422, "validation_error", {"labels.team": "must not contain NUL (\\u0000) characters"}),
    (json.dumps({"model": {"source": "local", "path": "/models/a\x00b"}, "method": "rtn"}), 422, "validation_error", {"model.path"}),
    ('{"model": {"source": "local", "path": "/m"}, "method": "bnb-8bit", "options": {"threshold": 1e999}}', 400, "invalid_json", None),
    ('{"model": {"source": "local", "path": "/m"}, "method": "bnb-8bit", "options": {"threshold": NaN}}', 400, "invalid_json", None),
    ('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "invalid_json", None),
    # A lone surrogate as an escape, as raw UTF-8-like bytes, and a NUL escape in a UTF-16 body (json.loads reads all).
    (json.dumps({**MINIMAL, "labels": {"team": "\ud800"}}), 422, "validation_error", {"labels.team"}),
    (json.dumps({**MINIMAL, "labels": {"team": "\ud800"}}, ensure_ascii=False).encode("utf-8", "surrogatepass"), 422,
     "validation_error", {"labels.team"}),
    (json.dumps({**MINIMAL, "labels": {"team": "nl\x00p"}}).encode("utf-16"), 422, "validation_error", {"labels.team"}),
]


def test_bad_bodies_are_rejected_and_nothing_is_stored(client, db, dispatcher):
    before = counts(db)
    for data, status, code, fields in BAD_BODIES:
        resp = client.post("/v1/jobs", data=data, content_type="application/json")
        assert resp.status_code == status, data
        body = resp.get_json()
        assert body["error"] == code and body["message"], data
        if isinstance(fields, dict):
            assert body["details"]["fields"] == fields, data
        elif fields:
            assert set(body["details"]["fields"]) == fields, data
    assert counts(db) == before
    assert dispatcher.jobs == []


def test_unknown_method_names_the_choices(client):
    body = client.post("/v1/jobs", json={**MINIMAL, "method": "magic"}).get_json()
    assert "'magic'" in body["details"]["fields"]["method"] and "gptq" in body["details"]["fields"]["method"]
    bits = client.post("/v1/jobs", json={**MINIMAL, "options": {"bits": 5}}).get_json()["details"]["fields"]["options.bits"]
    assert bits == "Input should be 2, 3, 4 or 8"


def test_secrets_never_leave_the_api(client, db, dispatcher, caplog):
    caplog.set_level(logging.DEBUG)
    resp = client.post("/v1/jobs", json=FULL)
    assert resp.status_code == 201
    job_id = resp.get_json()["id"]
    bad = dict(FULL, options={"bits": 5})  # a rejected body carrying secrets
    bodies = [resp.data, client.post("/v1/jobs", json=bad).data]
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/webhooks"):
        bodies.append(client.get(path).data)
    bodies.append(client.post(f"/v1/jobs/{job_id}/cancel").data)
    bodies.append(client.post(f"/v1/jobs/{job_id}/retry").data)
    for body in bodies:
        for secret in SECRETS:
            assert secret.encode() not in body
    for secret in SECRETS:
        assert secret not in caplog.text
    spec = resp.get_json()["spec"]
    assert spec["model"] == {"source": "hub", "repo_id": "org/name", "revision": "v1"}
    assert spec["webhooks"] == [{"url": "https://ci.example/***"}]  # webhook URLs are secrets too
    with db.session() as s:  # kept for the worker, nowhere else
        job = s.get(Job, job_id)
        assert job.secrets == {"model.token": FULL["model"]["token"], "destination.hub.token": FULL["destination"]["hub"]["token"],
                               "webhooks.0.secret": FULL["webhooks"][0]["secret"], "webhooks.0.url": FULL["webhooks"][0]["url"]}
        assert not any(secret in json.dumps(e.data) + (e.message or "") for e in job.events for secret in SECRETS)


def test_broker_down_still_creates_the_job(tmp_path, db, store, caplog):
    """A real Dispatcher pointed at a port where no broker listens: the job is stored and stays queued. On SQLite the
    failed wake-up is logged and recorded on the job (an idle worker's poll finds it); on PostgreSQL the submit never
    touches the broker (its insert announces the job)."""
    from quantfarm.queue import Dispatcher
    from quantfarm.settings import Settings
    from tests.api.conftest import make_app

    dispatcher = Dispatcher(Settings(home=tmp_path / "home", broker_url="redis://127.0.0.1:1/0"))
    client = make_app(db, store, dispatcher, tmp_path).test_client()
    caplog.set_level(logging.WARNING, logger="api.jobs")
    resp = client.post("/v1/jobs", json=MINIMAL)
    assert resp.status_code == 201
    job_id = resp.get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "queued"
    events = client.get(f"/v1/jobs/{job_id}/events").get_json()["items"]
    if woken_at_submit(db, [job_id]):
        assert f"Could not enqueue job {job_id}" in caplog.text
        assert events[-1]["kind"] == "log" and "started automatically" in events[-1]["message"]
    else:
        assert "Could not enqueue" not in caplog.text and [e["kind"] for e in events] == ["status"]


def test_webhooks_to_private_addresses_are_refused_at_submit(db, store, dispatcher, tmp_path):
    from tests.api.conftest import make_app

    client = make_app(db, store, dispatcher, tmp_path, webhook_allow_private=False).test_client()
    before = counts(db)
    hooks = [{"url": "https://8.8.8.8/ok"}, {"url": "http://10.1.2.3/hook"}, {"url": "http://127.0.0.1:9/x"}, {"url": "http://[::1]/x"}]
    resp = client.post("/v1/jobs", json={**MINIMAL, "webhooks": hooks})
    assert resp.status_code == 422
    fields = resp.get_json()["details"]["fields"]
    assert set(fields) == {"webhooks.1.url", "webhooks.2.url", "webhooks.3.url"}
    assert "private" in fields["webhooks.1.url"] and "loopback" in fields["webhooks.2.url"]
    assert counts(db) == before and dispatcher.jobs == []


def test_the_job_page_shows_expert_token_counts_and_the_gate(client, db):
    job_id = client.post("/v1/jobs", json=MINIMAL).get_json()["id"]
    _run(db, job_id)
    metrics = {"expert_tokens": {"0": {"mlp": [512, 0, 301, 211]}, "1": {"mlp": [7, 505, 300, 212]}},
               "rtn_experts": {"0": ["mlp.experts.1.gate_proj"]},
               "gate": {"passed": False, "ppl_increase_pct": 12.5, "max_ppl_increase_pct": 5.0}}
    _finish(db, job_id, job_store.JobStatus.FAILED, metrics=metrics, layers_total=2, error_code="quality_gate")
    page = client.get(f"/jobs/{job_id}").data.decode()
    assert 'id="expert-tokens"' in page and "512, 0, 301, 211" in page and "7, 505, 300, 212" in page
    assert page.index("512, 0, 301, 211") < page.index("7, 505, 300, 212")
    assert "rounded to nearest" in page
    assert "Quality gate <strong>failed</strong>" in page and "+12.50%" in page and "5.0% allowed" in page
