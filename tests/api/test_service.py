"""Service endpoints and the error boundary: /healthz, /metrics, /openapi.json, /docs, 4xx/5xx shapes."""

from __future__ import annotations

import logging
import re

import pytest

from tests.conftest import test_keyring
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from quantfarm.errors import ValidationFailed
from quantfarm.queue import Dispatcher
from quantfarm.settings import Settings
from quantfarm.spec import parse_spec
from storage import jobs as job_store
from storage.db import Database
from tests.api.conftest import FULL, MINIMAL, RecordingDispatcher, make_app


def test_healthz_ok(lite):
    resp = lite.test_client().get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "db": "ok", "broker": "ok"}


def test_healthz_503_when_the_broker_is_unreachable(sqlite_url, store, tmp_path):
    """A real Dispatcher pointed at a port where nothing listens."""
    db = Database(sqlite_url, keyring=test_keyring())
    broker = Dispatcher(Settings(home=tmp_path / "home", broker_url="redis://127.0.0.1:1/0"))
    resp = make_app(db, store, broker, tmp_path).test_client().get("/healthz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert (body["status"], body["db"], body["broker"]) == ("unavailable", "ok", "down")
    assert list(body["details"]) == ["broker"]


def test_healthz_503_when_the_database_is_unreachable(store, tmp_path):
    """A real PostgreSQL URL on a port where nothing listens."""
    db = Database("postgresql+psycopg://postgres@127.0.0.1:1/quantfarm")
    resp = make_app(db, store, RecordingDispatcher(), tmp_path).test_client().get("/healthz")
    assert resp.status_code == 503
    assert {k: resp.get_json()[k] for k in ("status", "db", "broker")} == {"status": "unavailable", "db": "down", "broker": "ok"}


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.]+(?:[eE][+-]?[0-9]+)?|NaN|[+-]Inf)$')  # 7.9e-05 too
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Parse Prometheus text format strictly enough to catch malformed lines."""
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        m = _LINE.match(line)
        assert m, f"malformed metrics line: {line!r}"
        name, labels, value = m.groups()
        assert name in typed or re.sub(r"_(sum|count|bucket|total)$", "", name) in typed, f"{name} has no TYPE line"
        samples[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = float(value)
    return samples


def test_metrics_counts_jobs_requests_and_durations(app, client, db, submit):
    ids = [submit()["id"] for _ in range(3)]
    for job_id, status in zip(ids, (job_store.JobStatus.SUCCEEDED, job_store.JobStatus.FAILED)):
        with db.session() as s:
            job_store.claim(s, job_id, "w", 60)
        with db.session() as s:
            job_store.transition(s, job_store.get_job(s, job_id), status)
    client.get("/v1/jobs/job_nope")
    client.get("/nowhere")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    m = _parse_metrics(resp.get_data(as_text=True))
    assert {st: m[("quantfarm_jobs", (("status", st),))] for st in ("queued", "running", "succeeded", "failed", "cancelled")} == {
        "queued": 1, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    req = lambda route, method, code: m[("quantfarm_http_requests_total", (("code", str(code)), ("method", method), ("route", route)))]
    assert req("/v1/jobs", "POST", 201) == 3
    assert req("/v1/jobs/<job_id>", "GET", 404) == 1
    assert req("<unmatched>", "GET", 404) == 1
    for status in ("succeeded", "failed"):
        labels = (("method", "gptq"), ("status", status))
        assert m[("quantfarm_job_duration_seconds_count", labels)] == 1
        assert m[("quantfarm_job_duration_seconds_sum", labels)] >= 0
        assert ("quantfarm_job_duration_seconds", (*labels[:1], ("quantile", "0.5"), labels[1])) in m


def test_openapi_is_valid_and_documents_every_route(lite):
    doc = lite.test_client().get("/openapi.json").get_json()
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    for rule in lite.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("web."):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, f"{method} {path} is not in /openapi.json"


GOOD = [
    MINIMAL,
    FULL,
    {"model": {"source": "s3", "uri": "s3://models/llama/"}, "method": "awq", "options": {"zero_point": False, "version": "gemv"}},
    {"model": {"source": "local", "path": "/m"}, "method": "bnb-4bit", "options": {"quant_type": "fp4", "skip_modules": ["lm_head"]}},
    {"model": {"source": "local", "path": "/m"}, "method": "rtn", "calibration": {"texts": ["a b c"], "num_samples": 4, "seq_len": 16}},
]
BAD = [
    {**MINIMAL, "method": "magic"},
    {**MINIMAL, "options": {"bits": 5}},
    {**MINIMAL, "options": {"wobble": 1}},
    {"method": "gptq"},
    {**MINIMAL, "colour": "blue"},
    {**MINIMAL, "model": {"source": "ftp", "path": "/m"}},
    {**MINIMAL, "model": {"source": "local"}},
    {**MINIMAL, "method": "awq", "options": {"bits": 8}},
    {**MINIMAL, "calibration": {"num_samples": 0}},
    {**MINIMAL, "priority": 11},
    {**MINIMAL, "webhooks": [{"url": "https://x.example", "secret": 5}]},
]


def test_openapi_request_schema_agrees_with_parse_spec(lite):
    doc = lite.test_client().get("/openapi.json").get_json()
    schema = Draft202012Validator({"$ref": "#/components/schemas/JobSpec", "components": doc["components"]})
    for body in GOOD:
        parse_spec(body)
        assert schema.is_valid(body), list(schema.iter_errors(body))
    for body in BAD:
        with pytest.raises(ValidationFailed):
            parse_spec(body)
        assert not schema.is_valid(body), body


def test_responses_match_their_openapi_schemas(lite):
    client = lite.test_client()
    doc = client.get("/openapi.json").get_json()

    def check(model, body):
        Draft202012Validator({"$ref": f"#/components/schemas/{model}", "components": doc["components"]}).validate(body)

    job = client.post("/v1/jobs", json=FULL).get_json()
    check("JobOut", job)
    check("JobPage", client.get("/v1/jobs").get_json())
    check("EventList", client.get(f"/v1/jobs/{job['id']}/events").get_json())
    check("ErrorBody", client.post("/v1/jobs", json={"method": "gptq"}).get_json())
    check("Health", client.get("/healthz").get_json())


def test_docs_page_renders_the_spec_offline(lite):
    resp = lite.test_client().get("/docs")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    for text in ("/v1/jobs/{job_id}/cancel", 'id="schema-GPTQOptions"', "damp_percent", "Dampening added to the Hessian diagonal",
                 "chosen by <code>method</code>", '<a href="#schema-JobOut">JobOut</a>'):
        assert text in html
    assert "<script" not in html and "<link" not in html and "src=" not in html


def test_http_errors_have_the_error_shape(lite):
    client = lite.test_client()
    resp = client.delete("/v1/jobs")
    assert resp.status_code == 405 and resp.get_json()["error"] == "method_not_allowed"
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST"}
    resp = client.get("/v2/nothing")
    assert resp.status_code == 404 and resp.get_json() == {
        "error": "not_found", "message": "Nothing is served at this URL; see /docs for the API.", "details": {}}
    lite.config["MAX_CONTENT_LENGTH"] = 100
    resp = client.post("/v1/jobs", json={**MINIMAL, "labels": {"pad": "x" * 200}})
    assert resp.status_code == 413 and resp.get_json()["error"] == "payload_too_large"
    assert resp.get_json()["details"] == {"limit_bytes": 100}


def test_unexpected_errors_are_500_without_leaking(sqlite_url, store, tmp_path, caplog):
    from sqlalchemy.exc import StatementError

    db = Database(sqlite_url, keyring=test_keyring())
    app = make_app(db, store, RecordingDispatcher(), tmp_path)

    secret = "hf_" + "LEAKME"  # built at run time so the traceback's source line cannot show it

    def boom():
        raise StatementError("insert failed", "INSERT INTO jobs (secrets) VALUES (?)", [{"model.token": secret}], ValueError("x"))

    app.add_url_rule("/boom", "boom", boom)
    caplog.set_level(logging.ERROR)
    resp = app.test_client().get("/boom")
    assert resp.status_code == 500
    assert resp.get_json() == {"error": "internal_error", "message": "The server hit an unexpected error; it has been logged.", "details": {}}
    assert "Unhandled error on GET /boom" in caplog.text and "StatementError" in caplog.text
    assert secret not in caplog.text and secret.encode() not in resp.data
