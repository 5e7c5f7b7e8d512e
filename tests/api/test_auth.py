"""Auth modes, key life cycle, quotas and the request hardening that goes with them."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, text

from api.app import create_app
from api.auth import AuthConfigError
from quantfarm.secrets import KeyRing
from quantfarm.settings import Settings
from storage import teams as team_store
from storage.db import Database
from storage.models import ApiKey, Job
from tests.api.conftest import FULL, MINIMAL, SECRETS, RecordingDispatcher, counts


def _app(db, store, tmp_path, **settings):
    settings.setdefault("webhook_allow_private", True)
    settings.setdefault("local_roots", [Path("/")])  # MINIMAL's made-up folder; tests/api/test_local_roots.py checks roots
    app = create_app(Settings(home=tmp_path / "home", **settings), db=db, dispatcher=RecordingDispatcher(db), store=store)
    app.config["TESTING"] = True
    return app


def _key(db, role="member", team="t1"):
    with db.session() as s:
        try:
            t = team_store.get_team(s, team)
        except Exception:
            t = team_store.create_team(s, team)
        return team_store.create_key(s, t.id, role=role, name=role)


def test_auto_acts_as_local_admin_until_the_first_key(db, store, tmp_path):
    client = _app(db, store, tmp_path).test_client()
    me = client.get("/v1/me").get_json()
    assert me["local_admin"] is True and me["role"] == "admin"
    assert client.post("/v1/jobs", json=MINIMAL).status_code == 201
    made = client.post("/v1/keys", json={"role": "admin", "name": "first"})
    assert made.status_code == 201 and made.get_json()["key"].startswith("qf_key_")
    # The first key ends the keyless mode at once: the same loopback caller now needs a key.
    resp = client.get("/v1/jobs")
    assert resp.status_code == 401 and resp.get_json()["error"] == "unauthorized"
    ok = client.get("/v1/jobs", headers={"Authorization": f"Bearer {made.get_json()['key']}"})
    assert ok.status_code == 200 and len(ok.get_json()["items"]) == 1  # the admin sees the default team's job


def test_auth_on_needs_a_key_even_with_none_in_the_database(db, store, tmp_path):
    client = _app(db, store, tmp_path, auth="on").test_client()
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/healthz").status_code in (200, 503)  # service routes stay open for probes


def test_auto_on_a_non_loopback_address_needs_a_key(db, store, tmp_path):
    client = _app(db, store, tmp_path, host="0.0.0.0").test_client()
    assert client.get("/v1/jobs").status_code == 401


def test_auth_off_on_a_non_loopback_address_refuses_to_start(db, store, tmp_path):
    with pytest.raises(AuthConfigError, match="QUANTFARM_AUTH=off is refused on 0.0.0.0"):
        _app(db, store, tmp_path, auth="off", host="0.0.0.0")


def test_revoked_key_is_401_and_last_used_moves(db, store, tmp_path):
    new = _key(db)
    client = _app(db, store, tmp_path, auth="on", auth_cache_seconds=0).test_client()
    h = {"Authorization": f"Bearer {new.key}"}
    with db.session() as s:
        assert s.get(ApiKey, new.row.id).last_used_at is None
    assert client.get("/v1/jobs", headers=h).status_code == 200
    with db.session() as s:
        assert s.get(ApiKey, new.row.id).last_used_at is not None
        assert new.key not in str(s.execute(text("SELECT * FROM api_keys")).all())  # only the hash is stored
    assert client.delete(f"/v1/keys/{new.row.id}", headers=h).status_code == 200
    assert client.get("/v1/jobs", headers=h).status_code == 401


def test_queued_quota_is_429_with_retry_after_and_creates_nothing(db, store, tmp_path):
    new = _key(db)
    client = _app(db, store, tmp_path, auth="on", team_max_queued=2).test_client()
    h = {"Authorization": f"Bearer {new.key}"}
    for _ in range(2):
        assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201
    before = counts(db)
    resp = client.post("/v1/jobs", json=MINIMAL, headers=h)
    assert resp.status_code == 429 and resp.get_json()["error"] == "quota_exceeded"
    assert int(resp.headers["Retry-After"]) > 0 and resp.get_json()["details"]["limit"] == 2
    assert counts(db) == before
    # Another team has its own quota.
    other = _key(db, team="t2")
    assert client.post("/v1/jobs", json=MINIMAL, headers={"Authorization": f"Bearer {other.key}"}).status_code == 201


def test_the_quota_counts_up_to_the_limit_and_the_429_names_every_queued_job(db, store, tmp_path):
    """The quota's count stops at the limit (api/job_service.py); over it, the answer still gives the exact count."""
    new = _key(db)
    client = _app(db, store, tmp_path, auth="on", team_max_queued=1000).test_client()
    h = {"Authorization": f"Bearer {new.key}"}
    for _ in range(5):
        assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201
    with db.session() as s:
        team_store.get_team(s, "t1").max_queued = 3  # the team's own limit, now below its queue
    resp = client.post("/v1/jobs", json=MINIMAL, headers=h)
    assert resp.status_code == 429 and resp.get_json()["details"] == {"queued": 5, "limit": 3, "retry_after": 30}
    assert "Your team has 5 queued jobs" in resp.get_json()["message"]
    with db.session() as s:
        team_store.get_team(s, "t1").max_queued = 6
    assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201  # 5 < 6
    assert client.post("/v1/jobs", json=MINIMAL, headers=h).get_json()["details"] == {"queued": 6, "limit": 6, "retry_after": 30}


def test_the_quota_reads_the_teams_count_and_a_miscount_never_refuses(db, store, tmp_path):
    """The quota sums the team's counted queued jobs (storage.models.TeamQueued); a 429 is decided and detailed by the
    jobs themselves, so a count too high lets the submit through, and a count too low is what it reads."""
    from sqlalchemy import func, select, update

    from storage.models import TeamQueued

    new = _key(db)
    client = _app(db, store, tmp_path, auth="on", team_max_queued=3).test_client()
    h = {"Authorization": f"Bearer {new.key}"}
    # The count is kept in slots (one a database connection); the miscounts are made in one of them.
    one_slot = TeamQueued.slot == select(func.min(TeamQueued.slot)).scalar_subquery()
    assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201
    with db.session() as s:
        s.execute(update(TeamQueued).where(one_slot).values(queued=TeamQueued.queued + 50))  # counted 51, queued 1
    assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201
    with db.session() as s:
        s.execute(update(TeamQueued).where(one_slot).values(queued=TeamQueued.queued - 51))  # counted 1, queued 2
    assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201
    assert client.post("/v1/jobs", json=MINIMAL, headers=h).status_code == 201  # counted 2 < 3: passes, queued 4
    resp = client.post("/v1/jobs", json=MINIMAL, headers=h)  # counted 3: the jobs decide and name the count
    assert resp.status_code == 429 and resp.get_json()["details"] == {"queued": 4, "limit": 3, "retry_after": 30}


def test_submit_checks_the_body_before_the_key(db, store, tmp_path):
    client = _app(db, store, tmp_path, auth="on").test_client()
    assert client.post("/v1/jobs", data=b"{nope", content_type="application/json").status_code == 400
    assert client.post("/v1/jobs", json={"method": "gptq"}).status_code == 422
    assert client.post("/v1/jobs", json=MINIMAL).status_code == 401
    viewer = _key(db, role="viewer")
    resp = client.post("/v1/jobs", json=MINIMAL, headers={"Authorization": f"Bearer {viewer.key}"})
    assert resp.status_code == 403 and resp.get_json()["details"] == {"role": "viewer", "required": "member"}


def test_members_cannot_mint_stronger_keys_or_reach_farm_routes(db, store, tmp_path):
    member = _key(db)
    client = _app(db, store, tmp_path, auth="on").test_client()
    h = {"Authorization": f"Bearer {member.key}"}
    assert client.post("/v1/keys", json={"role": "admin"}, headers=h).status_code == 403
    assert client.post("/v1/keys", json={"role": "viewer", "team": "nope"}, headers=h).status_code == 404
    assert client.get("/v1/teams", headers=h).status_code == 403
    assert client.post("/v1/teams", json={"name": "x"}, headers=h).status_code == 403


def test_credentials_are_write_only_and_referenced_by_name(db, store, tmp_path):
    member = _key(db)
    client = _app(db, store, tmp_path, auth="on").test_client()
    h = {"Authorization": f"Bearer {member.key}"}
    resp = client.post("/v1/credentials", json={"name": "hub-write", "kind": "hub", "token": "hf_stored_SECRET"}, headers=h)
    assert resp.status_code == 201 and "hf_stored_SECRET" not in resp.get_data(as_text=True)
    assert client.get("/v1/credentials", headers=h).get_json()["items"][0]["name"] == "hub-write"
    with db.session() as s:  # encrypted at rest
        raw = str(s.execute(text("SELECT secret FROM credentials")).all())
        assert "hf_stored_SECRET" not in raw and "fernet" in raw
    body = {**MINIMAL, "model": {"source": "hub", "repo_id": "org/m", "credentials_ref": "hub-write"}}
    assert client.post("/v1/jobs", json=body, headers=h).status_code == 201
    before = counts(db)
    bad = client.post("/v1/jobs", json={**body, "model": {**body["model"], "credentials_ref": "missing"}}, headers=h)
    assert bad.status_code == 422 and "model.credentials_ref" in bad.get_json()["details"]["fields"]
    both = client.post("/v1/jobs", json={**body, "model": {**body["model"], "token": "hf_x"}}, headers=h)
    assert both.status_code == 422
    assert counts(db) == before
    # Another team cannot use it by name.
    other = _key(db, team="t2")
    resp = client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {other.key}"})
    assert resp.status_code == 422 and "model.credentials_ref" in resp.get_json()["details"]["fields"]


def test_job_secrets_are_encrypted_in_the_raw_database(db, store, tmp_path):
    client = _app(db, store, tmp_path).test_client()
    job = client.post("/v1/jobs", json=FULL).get_json()
    with db.engine.connect() as conn:
        raw = " ".join(str(r) for r in conn.execute(text("SELECT * FROM jobs")).all())
        raw += " ".join(str(r) for r in conn.execute(text("SELECT * FROM job_events")).all())
    for secret in (*SECRETS, FULL["webhooks"][0]["url"]):
        assert secret not in raw
    with db.session() as s:  # and the worker still reads them
        assert s.get(Job, job["id"]).secrets["model.token"] == FULL["model"]["token"]


def test_key_rotation_reads_old_secrets_and_rotate_rewrites_them(db, store, tmp_path):
    from storage.teams import rotate_secrets as rotate_all

    client = _app(db, store, tmp_path).test_client()
    job_id = client.post("/v1/jobs", json=FULL).get_json()["id"]
    rotated = Database(db.url, keyring=KeyRing(["a-brand-new-key-for-2027", "quantfarm-test-secret-key-0001"]))
    with rotated.session() as s:
        assert s.get(Job, job_id).secrets["model.token"] == FULL["model"]["token"]
    assert rotate_all(rotated) >= 1
    only_new = Database(db.url, keyring=KeyRing(["a-brand-new-key-for-2027"]))
    with only_new.session() as s:
        assert s.get(Job, job_id).secrets["model.token"] == FULL["model"]["token"]
    for d in (rotated, only_new):
        d.dispose()


def test_hardening_headers_host_allowlist_and_limits(db, store, tmp_path):
    client = _app(db, store, tmp_path).test_client()
    page = client.get("/jobs")
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    # DNS rebinding: a forged Origin matching a forged Host no longer passes on a loopback farm.
    evil = client.post("/v1/jobs", json=MINIMAL, headers={"Host": "evil.example", "Origin": "http://evil.example"})
    assert evil.status_code == 400
    before = counts(db)
    big = client.post("/v1/jobs", json={**MINIMAL, "calibration": {"texts": ["x" * 1_100_000]}})
    assert big.status_code == 413
    sur = client.post("/v1/jobs", data=b'{"model": {"source": "local", "path": "/x\\ud800"}, "method": "gptq"}',
                      content_type="application/json")
    assert sur.status_code == 422 and "model.path" in sur.get_json()["details"]["fields"]
    assert counts(db) == before


def test_lists_leave_calibration_texts_out(db, store, tmp_path):
    client = _app(db, store, tmp_path).test_client()
    job = client.post("/v1/jobs", json={**MINIMAL, "calibration": {"texts": ["t" * 50_000] * 10}}).get_json()
    listed = client.get("/v1/jobs?limit=5")
    assert len(listed.data) < 20_000
    assert listed.get_json()["items"][0]["spec"]["calibration"]["texts_count"] == 10
    assert len(client.get(f"/v1/jobs/{job['id']}").get_json()["spec"]["calibration"]["texts"]) == 10


def test_pages_redirect_to_sign_in_and_sessions_work(db, store, tmp_path):
    member = _key(db)
    client = _app(db, store, tmp_path, auth="on").test_client()
    resp = client.get("/jobs")
    assert resp.status_code == 302 and "/signin" in resp.headers["Location"]
    bad = client.post("/signin", data={"key": "qf_wrong", "next": "/jobs"})
    assert bad.status_code == 401 and "unknown or revoked" in bad.get_data(as_text=True)
    ok = client.post("/signin", data={"key": member.key, "next": "//evil.example/"})
    assert ok.status_code == 303 and ok.headers["Location"] == "/jobs"  # never off-site
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and member.key not in cookie
    assert client.get("/jobs").status_code == 200
    assert client.get("/v1/me").get_json()["key_id"] == member.row.id  # the page scripts call the API with it
    client.post("/signout")
    assert client.get("/jobs").status_code == 302
    assert client.get("/v1/me").status_code == 401


def test_webhook_urls_are_masked_everywhere_but_the_send(db, store, tmp_path):
    from storage import webhooks as webhook_store
    from storage.models import WebhookDelivery, utcnow

    client = _app(db, store, tmp_path).test_client()
    url = "https://ci.example/hooks/quantfarm?token=ci_SECRET_five"
    other = "https://other.example/hook"
    job = client.post("/v1/jobs", json={**MINIMAL, "webhooks": [{"url": url}, {"url": other}]}).get_json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # ends it: both deliveries are made
    shown = client.get(f"/v1/jobs/{job['id']}/webhooks").get_json()["items"]
    assert {d["url"] for d in shown} == {"https://ci.example/***", "https://other.example/***"}
    with db.session() as s:
        rows = list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"]).order_by(WebhookDelivery.hook_index)))
        assert all("ci_SECRET_five" not in r.payload and "ci_SECRET_five" not in r.url for r in rows)  # not even the other receiver's body
        claim = webhook_store.claim_attempt(s, rows[0], utcnow())
    assert claim.url == url  # only the send itself uses the real URL
