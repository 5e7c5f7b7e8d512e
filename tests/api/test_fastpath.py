"""api/fastpath.py: the plain GETs of one job and a page of jobs answered before Flask, as the Flask views answer them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import request_started
from werkzeug.test import Client

from storage.db import Database
from storage.models import Artifact, utcnow
from tests.api.conftest import MINIMAL, RecordingDispatcher, make_app
from tests.api.test_service import _parse_metrics


def _key(db, team: str, role: str) -> tuple[str, dict[str, str]]:
    from storage import teams as team_store

    with db.session() as s:
        t = team_store.create_team(s, team)
        return t.id, {"Authorization": f"Bearer {team_store.create_key(s, t.id, role=role, name=role).key}"}


@pytest.fixture
def farm(pg_url, store, tmp_path):
    """An app with auth on: team t1 (a member key, 25 jobs, two with artifacts), team t2 (a member key, 3 jobs), an admin."""
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    app = make_app(db, store, RecordingDispatcher(), tmp_path, auth="on")
    client = app.test_client()
    (t1, member), (_, other), (_, admin) = _key(db, "t1", "member"), _key(db, "t2", "member"), _key(db, "t3", "admin")
    ids = [client.post("/v1/jobs", json=MINIMAL, headers=member).get_json()["id"] for _ in range(25)]
    theirs = [client.post("/v1/jobs", json=MINIMAL, headers=other).get_json()["id"] for _ in range(3)]
    t0 = utcnow()
    with db.session() as s:
        for n, (job_id, name, kind) in enumerate(((ids[3], "art_b1", "model"), (ids[3], "art_b2", "eval"), (ids[20], "art_a1", "model"))):
            s.add(Artifact(id=name, job_id=job_id, kind=kind, format="gptq", location="x", sha256="ab" * 32, file_count=1,
                           size_bytes=7, files=[], created_at=t0 + timedelta(seconds=n)))
    dispatched: list[str] = []
    request_started.connect(lambda sender, **kw: dispatched.append(kw.get("path", "")), app, weak=False)
    for who in (member, other, admin):
        client.get("/v1/jobs", headers=who)  # a key's first use: Flask reads it and records its use
    yield {"app": app, "db": db, "client": client, "member": member, "other": other, "admin": admin, "t1": t1,
           "ids": ids, "theirs": theirs, "flask_calls": dispatched}
    db.dispose()


def flask_view(app):
    """A client of the app's own Flask handling, the fast path left out."""
    return Client(app.wsgi_app.wsgi_app, app.response_class)


def test_fast_answers_equal_the_flask_views(farm):
    app, client, ids, theirs = farm["app"], farm["client"], farm["ids"], farm["theirs"]
    member, other, admin = farm["member"], farm["other"], farm["admin"]
    newest = ids[::-1]
    first = client.get("/v1/jobs?limit=20", headers=member).get_json()
    assert first["next_cursor"] == newest[19]
    requests = [
        (f"/v1/jobs/{ids[3]}", member), (f"/v1/jobs/{ids[20]}", member), (f"/v1/jobs/{theirs[0]}", other),
        (f"/v1/jobs/{theirs[0]}", admin),  # an admin reads every team's jobs
        ("/v1/jobs?limit=20", member), (f"/v1/jobs?limit=20&cursor={newest[19]}", member),
        (f"/v1/jobs?status=queued&cursor={newest[19]}&limit=3", member), ("/v1/jobs", member), ("/v1/jobs?limit=", member),
        ("/v1/jobs?limit=200", admin), ("/v1/jobs?limit=2&status=running", admin), ("/v1/jobs", other),
    ]
    view = flask_view(app)
    for path, who in requests:
        farm["flask_calls"].clear()
        fast = client.get(path, headers=who)
        assert farm["flask_calls"] == [], path  # answered before Flask
        slow = view.get(path, headers=who)
        assert farm["flask_calls"] != [], path
        assert (fast.status, fast.get_data()) == (slow.status, slow.get_data()) and fast.status_code == 200, path
        assert sorted(fast.headers.items()) == sorted(slow.headers.items()), path
    assert fast.headers["X-Frame-Options"] == "DENY" and fast.headers["Content-Type"] == "application/json"

    page = client.get(f"/v1/jobs?limit=20&cursor={newest[19]}", headers=member).get_json()
    assert [j["id"] for j in page["items"]] == newest[20:] and page["next_cursor"] is None
    job = client.get(f"/v1/jobs/{ids[3]}", headers=member).get_json()
    assert [a["id"] for a in job["artifacts"]] == ["art_b1", "art_b2"] and job["team_id"] == farm["t1"]
    everyone = client.get("/v1/jobs?limit=200", headers=admin).get_json()["items"]
    assert {j["id"] for j in everyone} == set(ids) | set(theirs)
    assert [j["id"] for j in client.get("/v1/jobs", headers=other).get_json()["items"]] == theirs[::-1]  # own team only

    m = _parse_metrics(client.get("/metrics", headers=admin).get_data(as_text=True))
    counted = {route: m[("quantfarm_http_requests_total", (("code", "200"), ("method", "GET"), ("route", route)))]
               for route in ("/v1/jobs/<job_id>", "/v1/jobs")}
    # Each request above twice (fast and Flask), the fixture's three first uses, the first page and the four reads after.
    assert counted == {"/v1/jobs/<job_id>": 4 * 2 + 1, "/v1/jobs": 8 * 2 + 3 + 1 + 3}


def test_fast_answers_equal_the_flask_views_for_every_kind_of_job_and_follow_each_change(farm):
    """Texts counted in a page, labels and errors beyond ASCII, floats that print in exponent form, -0.0 and NaN, an
    artifact's source files: equal bytes before Flask and through it, read again (the kept encoded view) and after
    each change of the row (api/fastpath.py keeps encoded views by the rows they came from)."""
    from sqlalchemy import update

    from storage.models import Artifact, Job

    app, client, ids, member, db = farm["app"], farm["client"], farm["ids"], farm["member"], farm["db"]
    spec = client.get(f"/v1/jobs/{ids[5]}", headers=member).get_json()["spec"]
    texts = {**spec, "labels": {"équipe": "nlp ☃ \U0001f600", "ctl": "a\x7fb\u2028"},
             "calibration": {**spec["calibration"], "texts": ["one", "two", "drei"]},
             "evaluation": {**spec["evaluation"], "texts": ["x"]}}
    metrics = {"loss": 7.4e-05, "big": 1e16, "zero": -0.0, "ppl": 40.075, "n": 2**70}
    with db.session() as s:
        s.execute(update(Job).where(Job.id == ids[5]).values(spec=texts, metrics=metrics, error_code="oom",
                                                            error_message="zu groß: ☃", layers_done=3, layers_total=8,
                                                            eta_seconds=0.0, status="failed", stage="calibrating"))
        s.execute(update(Job).where(Job.id == ids[6]).values(eta_seconds=float("nan"), layers_done=0, layers_total=4))
        s.add(Artifact(id="art_c1", job_id=ids[5], kind="model", format="gguf", location="s3://b/ü", sha256="cd" * 32,
                       file_count=2, size_bytes=2**40, files=[], source_revision="abc",
                       source_files={"config.json": "ef" * 32, "ü.bin": "01" * 32}, created_at=utcnow()))
    view = flask_view(app)
    paths = [f"/v1/jobs/{ids[5]}", f"/v1/jobs/{ids[6]}", "/v1/jobs?limit=25", "/v1/jobs?status=failed"]

    def same(what):
        for path in paths:
            for _ in range(2):  # made, then kept
                farm["flask_calls"].clear()
                fast = client.get(path, headers=member)
                assert farm["flask_calls"] == [], (what, path)
                slow = view.get(path, headers=member)
                assert (fast.status_code, fast.get_data()) == (200, slow.get_data()), (what, path)

    same("first")
    job = client.get(f"/v1/jobs/{ids[5]}", headers=member).get_json()
    assert job["spec"]["calibration"]["texts"] == ["one", "two", "drei"] and job["metrics"]["n"] == 2**70
    items = client.get("/v1/jobs?status=failed", headers=member).get_json()["items"]
    assert items[0]["spec"]["calibration"]["texts_count"] == 3 and "texts" not in items[0]["spec"]["calibration"]
    assert b'"eta_seconds":0.0' in client.get(f"/v1/jobs/{ids[5]}", headers=member).get_data()
    at = utcnow()  # the same updated_at each time: the rows differ by the change alone
    for change in ({"eta_seconds": -0.0}, {"eta_seconds": 0.0}, {"eta_seconds": 12.5}, {"status": "cancelled"},
                   {"metrics": {"loss": 1e-07}}):
        with db.session() as s:
            s.execute(update(Job).where(Job.id == ids[5]).values(**change, updated_at=at))
        same(change)
        got = client.get(f"/v1/jobs/{ids[5]}", headers=member).get_json()
        key, value = next(iter(change.items()))
        shown = got["progress"]["eta_seconds"] if key == "eta_seconds" else got[key]
        assert repr(shown) == repr(value), change
    with db.session() as s:
        s.execute(update(Artifact).where(Artifact.id == "art_c1").values(size_bytes=5))
    same("an artifact changed")
    assert client.get(f"/v1/jobs/{ids[5]}", headers=member).get_json()["artifacts"][0]["size_bytes"] == 5


def test_everything_else_goes_to_flask(farm, monkeypatch):
    app, client, ids, theirs = farm["app"], farm["client"], farm["ids"], farm["theirs"]
    member, other = farm["member"], farm["other"]
    job = f"/v1/jobs/{ids[0]}"
    cases = [
        ("no key", job, {}, 401), ("another scheme", job, {"Authorization": "Basic abc"}, 401),
        ("an unknown key", job, {"Authorization": "Bearer qf_not_a_key"}, 401),
        ("another team's job", f"/v1/jobs/{theirs[0]}", member, 404), ("no such job", f"/v1/jobs/job_{'0' * 26}", member, 404),
        ("an id of another form", "/v1/jobs/JOB_X", member, 404), ("a query on one job", f"{job}?x=1", member, 200),
        ("a bad status", "/v1/jobs?status=nope", member, 422), ("a bad limit", "/v1/jobs?limit=0", member, 422),
        ("a bad cursor", "/v1/jobs?cursor=job_x", member, 422), ("a limit given twice", "/v1/jobs?limit=1&limit=2", member, 200),
        ("another parameter", "/v1/jobs?limit=1&x=1", member, 200), ("an escaped value", "/v1/jobs?status=queue%64", member, 200),
        ("an untrusted host", job, {**member, "Host": "evil.example"}, 400),
    ]
    view = flask_view(app)
    for what, path, headers, status in cases:
        farm["flask_calls"].clear()
        r = client.get(path, headers=headers)
        assert farm["flask_calls"] != [] or status == 400, what  # (a bad Host fails before Flask's request_started)
        slow = view.get(path, headers=headers)
        assert (r.status_code, r.get_data(), sorted(r.headers.items())) == (status, slow.get_data(), sorted(slow.headers.items())), what
    assert client.get("/v1/jobs?limit=1&limit=2", headers=member).get_json()["next_cursor"] == ids[-1]  # Flask's first value
    farm["flask_calls"].clear()
    assert client.head(job, headers=member).status_code == 200 and farm["flask_calls"]
    client.set_cookie("quantfarm_session", "x")  # a page session's cookie: Flask looks at it
    farm["flask_calls"].clear()
    assert client.get(job, headers=member).status_code == 200 and farm["flask_calls"]
    client.delete_cookie("quantfarm_session")

    # A key whose last use is due to be recorded: Flask records it, then the fast path answers again.
    import api.auth as auth_mod
    from storage.models import ApiKey

    with farm["db"].session() as s:
        key = s.query(ApiKey).filter(ApiKey.role == "member", ApiKey.team_id == farm["t1"]).one()
        before = key.last_used_at
    now = auth_mod.time.monotonic()
    monkeypatch.setattr(auth_mod.time, "monotonic", lambda: now + auth_mod.LAST_USED_EVERY + 1)
    for answered_by_flask in (True, False):
        farm["flask_calls"].clear()
        assert client.get(job, headers=member).status_code == 200
        assert bool(farm["flask_calls"]) == answered_by_flask
    with farm["db"].session() as s:
        assert s.get(ApiKey, key.id).last_used_at > before

    # A revoked key is forgotten at once: Flask answers its 401.
    assert client.delete(f"/v1/keys/{key.id}", headers=member).status_code == 200
    farm["flask_calls"].clear()
    assert client.get(job, headers=member).status_code == 401 and farm["flask_calls"]
    assert client.get("/v1/jobs", headers=other).status_code == 200


def test_a_database_error_is_answered_once_by_flask(farm, monkeypatch):
    """The fast path's read fails: Flask reads again and answers (a 503 while the database stays down), counted once."""
    import sqlalchemy as sa

    client, member = farm["client"], farm["member"]
    reads = []

    def down():
        reads.append(1)
        raise sa.exc.OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(farm["db"], "connect_read", down)
    monkeypatch.setattr(farm["db"], "held_read", down)  # the fast path's reads (a kept connection)
    farm["flask_calls"].clear()
    r = client.get(f"/v1/jobs/{farm['ids'][0]}", headers=member)
    assert (r.status_code, r.headers["Retry-After"], r.get_json()["error"]) == (503, "2", "service_unavailable")
    assert len(reads) == 2 and farm["flask_calls"]  # the fast path's try, then Flask's
    monkeypatch.undo()
    m = _parse_metrics(client.get("/metrics", headers=member).get_data(as_text=True))
    assert m[("quantfarm_http_requests_total", (("code", "503"), ("method", "GET"), ("route", "/v1/jobs/<job_id>")))] == 1


def _same_but_ids_and_times(a: bytes, b: bytes, ids: tuple[str, str]) -> bool:
    import re

    stamp = re.compile(rb'"(created_at|updated_at)":"[^"]*"')
    return stamp.sub(rb'"\1":"T"', a.replace(ids[0].encode(), b"ID")) == stamp.sub(rb'"\1":"T"', b.replace(ids[1].encode(), b"ID"))


def test_a_fast_submit_answers_as_the_flask_view_does(farm):
    """POST /v1/jobs of a local model is answered before Flask: the same status, headers and body (but the new job's id
    and times), the job stored, counted in the metrics; no broker message (the insert announces the job)."""
    app, client, member = farm["app"], farm["client"], farm["member"]
    broker = app.extensions["quantfarm"].dispatcher
    sent = len(broker.jobs)
    farm["flask_calls"].clear()
    fast = client.post("/v1/jobs", json=MINIMAL, headers=member)
    assert farm["flask_calls"] == [] and fast.status_code == 201
    slow = flask_view(app).post("/v1/jobs", json=MINIMAL, headers=member)
    assert farm["flask_calls"] != [] and slow.status_code == 201
    ids = (fast.get_json()["id"], slow.get_json()["id"])
    assert fast.status == slow.status and _same_but_ids_and_times(fast.get_data(), slow.get_data(), ids)
    assert [(k, v.replace(ids[0], "ID")) for k, v in fast.headers.items()] == [(k, v.replace(ids[1], "ID")) for k, v in slow.headers.items()]
    assert fast.headers["Location"] == f"/v1/jobs/{ids[0]}" and fast.headers["X-Frame-Options"] == "DENY"
    assert broker.jobs[sent:] == []
    assert client.get(f"/v1/jobs/{ids[0]}", headers=member).get_json()["status"] == "queued"
    m = _parse_metrics(client.get("/metrics", headers=member).get_data(as_text=True))
    # The fixture's 28 submits (each key's first through Flask), and these two.
    assert m[("quantfarm_http_requests_total", (("code", "201"), ("method", "POST"), ("route", "/v1/jobs")))] == 30


def test_a_submit_the_fast_path_cannot_finish_is_answered_by_flask_and_stored_at_most_once(farm, monkeypatch):
    import storage.job_reads as job_reads_mod

    app, client, member, db = farm["app"], farm["client"], farm["member"], farm["db"]
    broker = app.extensions["quantfarm"].dispatcher
    view = flask_view(app)

    def count_jobs() -> int:
        import sqlalchemy as sa

        with db.read() as s:
            return s.execute(sa.text("SELECT count(*) FROM jobs")).scalar()

    cases = [  # (what, body, headers, status): nothing stored, Flask answers as it would alone
        ("a bad body", b"{nope", {}, 400), ("a bad spec", b'{"method": "gptq"}', {}, 422),
        ("a path outside the roots", b'{"model": {"source": "local", "path": "relative"}, "method": "rtn"}', {}, 422),
        ("a cross-site form", b'{"model": {"source": "local", "path": "/m"}, "method": "rtn"}', {"Sec-Fetch-Site": "cross-site"}, 403),
        ("a query", b'{"model": {"source": "local", "path": "/m"}, "method": "rtn"}', {"X-Path": "?x=1"}, 201),
    ]
    for what, body, headers, status in cases:
        path = "/v1/jobs" + headers.pop("X-Path", "")
        before = count_jobs()
        farm["flask_calls"].clear()
        r = client.post(path, data=body, headers={**member, **headers}, content_type="application/json")
        assert farm["flask_calls"] != [] and r.status_code == status, (what, r.status_code, r.get_data())
        assert count_jobs() == before + (status == 201), what
        if status != 201:
            slow = view.post(path, data=body, headers={**member, **headers}, content_type="application/json")
            assert (r.get_data(), sorted(r.headers.items())) == (slow.get_data(), sorted(slow.headers.items())), what

    # Over the quota: Flask counts again and answers its 429.
    monkeypatch.setattr(app.extensions["quantfarm"].settings, "team_max_queued", 1)
    farm["flask_calls"].clear()
    before = count_jobs()
    r = client.post("/v1/jobs", json=MINIMAL, headers=member)
    assert (r.status_code, r.get_json()["error"], count_jobs()) == (429, "quota_exceeded", before) and farm["flask_calls"]
    monkeypatch.undo()

    # A failure after the commit: the job is stored once, and the view answers the error (a 500).
    sent = len(broker.jobs)
    monkeypatch.setattr(job_reads_mod, "inserted_job_view", lambda row: 1 / 0)
    farm["flask_calls"].clear()
    before = count_jobs()
    r = client.post("/v1/jobs", json=MINIMAL, headers=member)
    assert (r.status_code, r.get_json()["error"]) == (500, "internal_error") and farm["flask_calls"]
    assert count_jobs() == before + 1 and len(broker.jobs) == sent


def test_with_auth_off_a_request_without_a_key_is_answered_before_flask_as_the_local_admin(pg_url, store, tmp_path):
    """QUANTFARM_AUTH=off (a loopback farm, ``make run``): a request with neither key nor cookie is the local admin in the
    fast path as in Flask's ``authenticate``, with Flask's bytes. A cookie, and ``auto`` (whose answer needs the database:
    are there keys yet?), still go to Flask."""
    from storage.models import DEFAULT_TEAM_ID
    from tests.conftest import _truncate

    db = Database(pg_url)
    _truncate(db)
    calls: list[str] = []
    apps = {mode: make_app(db, store, RecordingDispatcher(), tmp_path, auth=mode) for mode in ("off", "auto")}
    for app in apps.values():
        request_started.connect(lambda sender, **kw: calls.append(sender.name), app, weak=False)
    app, client = apps["off"], apps["off"].test_client()
    try:
        fast = client.post("/v1/jobs", json=MINIMAL)
        assert calls == [] and fast.status_code == 201
        slow = flask_view(app).post("/v1/jobs", json=MINIMAL)
        assert calls != [] and slow.status_code == 201
        ids = (fast.get_json()["id"], slow.get_json()["id"])
        assert _same_but_ids_and_times(fast.get_data(), slow.get_data(), ids)
        assert [(k, v.replace(ids[0], "ID")) for k, v in fast.headers.items()] == [(k, v.replace(ids[1], "ID")) for k, v in slow.headers.items()]
        assert fast.headers.getlist("Vary") == ["Cookie"]  # a cookie would have made another caller
        assert fast.get_json()["team_id"] == DEFAULT_TEAM_ID
        for path in (f"/v1/jobs/{ids[0]}", "/v1/jobs?limit=20"):
            calls.clear()
            fast = client.get(path)
            assert calls == [] and fast.status_code == 200, path
            slow = flask_view(app).get(path)
            assert (fast.status, fast.get_data(), list(fast.headers.items())) == (slow.status, slow.get_data(), list(slow.headers.items())), path
        assert [j["id"] for j in client.get("/v1/jobs").get_json()["items"]] == [ids[1], ids[0]]

        calls.clear()
        client.set_cookie("quantfarm_session", "x")
        assert client.get(f"/v1/jobs/{ids[0]}").status_code == 200 and calls != []
        calls.clear()
        assert apps["auto"].test_client().get(f"/v1/jobs/{ids[0]}").status_code == 200 and calls != []  # no key yet: local admin
    finally:
        db.dispose()


def test_the_encoded_views_kept_are_bounded_by_their_text():
    """A job's spec can be a megabyte: the views kept by their rows hold at most ``max_chars`` of text."""
    from api.fastpath import EncodedViews
    from storage.job_reads import JOB_COLUMNS

    made: list[str] = []
    views = EncodedViews(lambda rows: made.append(rows[0][0]) or "x" * 40, max_chars=100)

    def rows(job_id: str) -> tuple:
        return ((job_id, *[None] * (len(JOB_COLUMNS) - 1)),)

    for job_id in ("job_a", "job_b", "job_a", "job_b"):
        assert views(rows(job_id)) == "x" * 40
    assert made == ["job_a", "job_b"]  # kept: 80 characters
    views(rows("job_c"))  # 120 > 100: emptied first
    views(rows("job_c"))
    views(rows("job_a"))
    assert made == ["job_a", "job_b", "job_c", "job_a"]
