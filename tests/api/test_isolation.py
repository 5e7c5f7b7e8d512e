"""Teams are isolated on every route: a matrix generated from /openapi.json.

Every operation the document lists (and test_service checks that every route is listed)
is called as: no key, a revoked key, another team's member, the owning team's viewer,
and the owning team's member. The expected status follows from the operation's declared
role (``x-role``) and whether it names a team's object (``x-team-object``): another
team's object is a 404 for every role, a weaker role a 403, no key or a revoked one a 401.
No response to another team carries the owning team's ids or secrets.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from sqlalchemy import select

from api.app import create_app
from quantfarm.settings import Settings
from storage import jobs as job_store
from storage import teams as team_store
from storage.models import Artifact, WebhookDelivery, new_id
from tests.api.conftest import FULL, SECRETS, RecordingDispatcher

HOOK_URL_SECRET = "https://ci.example/hooks/quantfarm"  # the full webhook URL is a secret too
RANK = {"viewer": 0, "member": 1, "admin": 2}


def _world(db, store, tmp_path):
    """Two teams; team A owns a job with an artifact, a delivery, an upload, a credential and keys."""
    app = create_app(Settings(home=tmp_path / "home", auth="on", auth_cache_seconds=0, webhook_allow_private=True),
                     db=db, dispatcher=RecordingDispatcher(db), store=store)
    app.config["TESTING"] = True
    keys = {}
    with db.session() as s:
        a = team_store.create_team(s, "team-a")
        b = team_store.create_team(s, "team-b")
        for name, team, role in (("own", a, "member"), ("viewer", a, "viewer"), ("other", b, "member"), ("revoked", a, "member"),
                                 ("victim", a, "viewer"), ("admin", b, "admin")):
            keys[name] = team_store.create_key(s, team.id, role=role, name=name)
        team_store.revoke_key(s, keys["revoked"].row)
        team_store.put_credential(s, a.id, "hub-a", "hub", {"token": "hf_credential_SECRET_four"}, None)
        team_ids = {"a": a.id, "b": b.id}
    client = app.test_client()
    own = {"Authorization": f"Bearer {keys['own'].key}"}
    job = client.post("/v1/jobs", json=FULL, headers=own).get_json()
    upload = client.post("/v1/uploads?filename=calib.txt", data=b"some calibration text " * 20, headers=own,
                         content_type="text/plain").get_json()
    data = b'{"quantization_config": {}}'
    store.put_bytes(f"jobs/{job['id']}/artifact/config.json", data)
    with db.session() as s:
        row = job_store.get_job(s, job["id"])
        job_store.transition(s, row, job_store.JobStatus.CANCELLED)  # ends it: its webhook delivery exists
        art_id = new_id("art")
        s.add(Artifact(id=art_id, job_id=job["id"], kind="model", format="gptq", location="x", sha256="ab" * 32, file_count=1,
                       size_bytes=len(data), files=[{"path": "config.json", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]))
        delivery_id = s.scalars(select(WebhookDelivery.id).where(WebhookDelivery.job_id == job["id"])).first()
        s.execute(WebhookDelivery.__table__.update().values(status="failed"))  # replayable
    ids = {"job_id": job["id"], "artifact_id": art_id, "delivery_id": delivery_id, "upload_id": upload["id"],
           "key_id": keys["victim"].row.id, "name": "hub-a", "path": "config.json"}
    return app, client, keys, ids, team_ids


def _bodies(ids):
    return {
        ("post", "/v1/jobs"): {"json": FULL},
        ("post", "/v1/uploads"): {"data": b"more text " * 40, "content_type": "text/plain", "query_string": {"filename": "c.txt"}},
        ("post", "/v1/teams"): {"json": {"name": "team-new"}},
        ("post", "/v1/keys"): {"json": {"role": "viewer", "name": "made"}},
        ("post", "/v1/credentials"): {"json": {"name": "s3-x", "kind": "s3", "access_key_id": "AKIA", "secret_access_key": "zzz_SECRET"}},
    }


def _expected(op: dict, who: str) -> set[int]:
    role, owned = op["x-role"], op.get("x-team-object")
    if who in ("none", "revoked"):
        return {401}
    if who == "other":
        if owned:
            return {404}
        return {403} if RANK[role] > RANK["member"] else {200, 201, 202}
    if who == "viewer":
        return {403} if RANK[role] > RANK["viewer"] else {200, 201, 202}
    return {403} if RANK[role] > RANK["member"] else {200, 201, 202, 409}  # own member: 409 for a job in the wrong state


def test_every_route_isolates_teams(db, store, tmp_path):
    app, client, keys, ids, team_ids = _world(db, store, tmp_path)
    doc = client.get("/openapi.json").get_json()
    bodies = _bodies(ids)
    headers = {"none": {}, **{w: {"Authorization": f"Bearer {keys[w].key}"} for w in ("revoked", "other", "viewer", "own")}}
    secrets = [*SECRETS, HOOK_URL_SECRET, "hf_credential_SECRET_four", "zzz_SECRET"]
    own_data = [ids["job_id"], ids["artifact_id"], ids["upload_id"], ids["delivery_id"], keys["own"].row.id, team_ids["a"], *secrets]
    checked = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if op["x-role"] is None:
                continue
            url = re.sub(r"\{(\w+)\}", lambda m: str(ids[m.group(1)]), path)
            kwargs = bodies.get((method, path), {})
            assert method in ("get", "delete") or kwargs or "requestBody" not in op, f"add a request body for {method.upper()} {path}"
            for who in ("none", "revoked", "other", "viewer", "own"):
                resp = client.open(url, method=method.upper(), headers=headers[who], **kwargs)
                assert resp.status_code in _expected(op, who), (method, path, who, resp.status_code, resp.get_data(as_text=True)[:300])
                body = resp.get_data(as_text=True)
                if resp.status_code == 404:  # a 404 may echo the id the caller sent, as it does for an unknown id
                    for part in url.split("/"):
                        body = body.replace(part, "<sent>") if len(part) > 8 else body
                leaked = [d for d in (secrets if who in ("own", "viewer") else own_data) if d in body]
                assert not leaked, (method, path, who, leaked)
                if resp.status_code >= 400:
                    assert resp.get_json()["error"]
                checked += 1
    assert checked >= 5 * 20


def test_admin_sees_every_team_and_ids_leak_nothing(db, store, tmp_path):
    app, client, keys, ids, team_ids = _world(db, store, tmp_path)
    admin = {"Authorization": f"Bearer {keys['admin'].key}"}
    other = {"Authorization": f"Bearer {keys['other'].key}"}
    assert client.get(f"/v1/jobs/{ids['job_id']}", headers=admin).status_code == 200
    assert ids["job_id"] in [j["id"] for j in client.get("/v1/jobs", headers=admin).get_json()["items"]]
    assert client.get("/v1/jobs", headers=other).get_json()["items"] == []
    # Another team's id and an id that never existed answer alike.
    a = client.get(f"/v1/jobs/{ids['job_id']}", headers=other)
    b = client.get("/v1/jobs/job_00000000000000000000000000", headers=other)
    assert a.status_code == b.status_code == 404 and a.get_json()["error"] == b.get_json()["error"] == "not_found"
    teams = {t["name"] for t in client.get("/v1/teams", headers=admin).get_json()["items"]}
    assert {"team-a", "team-b"} <= teams
    listed = {k["id"] for k in client.get("/v1/keys", headers=admin).get_json()["items"]}
    assert keys["own"].row.id in listed and keys["other"].row.id in listed
    assert all("key" not in k for k in client.get("/v1/keys", headers=admin).get_json()["items"])


def test_events_record_the_acting_key(db, store, tmp_path):
    app, client, keys, ids, team_ids = _world(db, store, tmp_path)
    own = {"Authorization": f"Bearer {keys['own'].key}"}
    job = client.post("/v1/jobs", json=FULL, headers=own).get_json()
    assert job["created_by"] == keys["own"].row.id and job["team_id"] == team_ids["a"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=own).status_code == 202
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=own).get_json()["items"]
    with db.session() as s:
        actors = [e.actor for e in job_store.get_job(s, job["id"]).events]
    assert actors == [keys["own"].row.id, keys["own"].row.id]
    assert keys["own"].key not in str(events)


@pytest.mark.parametrize("header", ["Bearer", "Basic abc", "Bearer qf_key_nope_x", "Token " + "x" * 10])
def test_malformed_or_unknown_keys_are_401(db, store, tmp_path, header):
    app, client, keys, ids, team_ids = _world(db, store, tmp_path)
    resp = client.get("/v1/jobs", headers={"Authorization": header})
    assert resp.status_code == 401 and resp.get_json()["error"] == "unauthorized"
