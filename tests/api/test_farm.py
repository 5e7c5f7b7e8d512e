"""GET /v1/workers, the /farm page and 422 too_large at submit, with real API keys on a real database."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import update

from api.app import create_app
from quantfarm.memory import estimate_at_submit
from quantfarm.settings import Settings
from storage import farm
from storage import jobs as job_store
from storage import teams as team_store
from storage.models import Worker, utcnow
from tests.api.conftest import RecordingDispatcher, counts

GIB = 1024**3


def _farm(db, store, tmp_path):
    app = create_app(Settings(home=tmp_path / "home", auth="on", auth_cache_seconds=0), db=db,
                     dispatcher=RecordingDispatcher(db), store=store)
    app.config["TESTING"] = True
    with db.session() as s:
        vision = team_store.create_team(s, "vision")
        ops = team_store.create_team(s, "ops")
        keys = {"member": team_store.create_key(s, ops.id, role="member", name="m"),
                "viewer": team_store.create_key(s, vision.id, role="viewer", name="v"),
                "admin": team_store.create_key(s, ops.id, role="admin", name="a")}
        job = job_store.create_job(s, method="gptq", model_ref="secret-model-name", spec={}, secrets={}, team_id=vision.id)
        for wid, mem in (("gpu-a:1:x", 24 * GIB), ("gpu-b:2:y", 80 * GIB)):
            farm.register(s, wid, device="cuda:0", memory_bytes=mem, methods=["gptq"], formats=["gptq"],
                          engine_version="0.2.0", hostname=wid.split(":")[0])
        job_store.claim(s, job.id, "gpu-b:2:y", 60)
        farm.beat(s, "gpu-b:2:y", job.id)
        job_store.create_job(s, method="rtn", model_ref="m", spec={}, secrets={}, team_id=ops.id)
    headers = {k: {"Authorization": f"Bearer {v.key}"} for k, v in keys.items()}
    return app.test_client(), headers, job.id, vision.id, keys


def test_workers_members_see_counts_admins_see_placement(db, store, tmp_path):
    client, headers, job_id, vision_id, keys = _farm(db, store, tmp_path)
    assert client.get("/v1/workers").status_code == 401
    for who in ("member", "viewer"):
        body = client.get("/v1/workers", headers=headers[who]).get_json()
        assert body == {"workers": 2, "busy": 1, "idle": 1, "utilization": 0.5, "queue_depth": 1, "running": 1,
                        "memory_bytes": {"largest": 80 * GIB, "total": 104 * GIB}, "devices": {"cuda:0": 2}}
    admin = client.get("/v1/workers", headers=headers["admin"]).get_json()
    busy = {w["id"]: w["job"] for w in admin["items"]}
    assert busy == {"gpu-a:1:x": None, "gpu-b:2:y": {"id": job_id, "team_id": vision_id, "team": "vision", "method": "gptq"}}

    assert client.get("/farm").status_code == 302  # pages sign in first
    pages = {}
    for who in ("viewer", "admin"):
        client.post("/signin", data={"key": keys[who].key, "next": "/farm"}, headers={"Sec-Fetch-Site": "same-origin"})
        pages[who] = client.get("/farm").get_data(as_text=True)
        client.post("/signout", headers={"Sec-Fetch-Site": "same-origin"})
    assert "50%" in pages["viewer"] and "80.0 GiB" in pages["viewer"] and job_id not in pages["viewer"] and "gpu-b" not in pages["viewer"]
    assert job_id in pages["admin"] and "gpu-b:2:y" in pages["admin"] and "vision" in pages["admin"]


def test_a_job_bigger_than_every_worker_is_422_too_large_and_creates_nothing(db, store, tmp_path, tiny_llama):
    client, headers, _, _, keys = _farm(db, store, tmp_path)
    # A wide model: one layer's float32 weights and Hessians take ~35 GiB (a big calibration set no longer would:
    # activations beyond the worker's bound go to its scratch disk).
    big = tmp_path / "wide-llama"
    big.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_attention_heads=128, num_key_value_heads=128, head_dim=128)
    (big / "config.json").write_text(json.dumps(config))
    body = {"model": {"source": "local", "path": str(big)}, "method": "gptq"}
    need = estimate_at_submit(body)
    assert 24 * GIB < need < 80 * GIB
    with db.session() as s:  # only the 24 GiB worker is alive now
        s.execute(update(Worker).where(Worker.id == "gpu-b:2:y").values(last_seen_at=utcnow() - timedelta(hours=1)))
    before = counts(db)
    resp = client.post("/v1/jobs", json=body, headers=headers["member"])
    assert resp.status_code == 422, resp.get_json()
    err = resp.get_json()
    assert err["error"] == "too_large" and err["details"] == {"estimate_bytes": need, "largest_worker_bytes": 24 * GIB}
    assert counts(db) == before
    ok = client.post("/v1/jobs", json={**body, "model": {"source": "local", "path": str(tiny_llama)},
                                       "calibration": {"num_samples": 8, "seq_len": 64}}, headers=headers["member"])
    assert ok.status_code == 201, ok.get_json()
    with db.session() as s:
        estimate = job_store.get_job(s, ok.get_json()["id"]).memory_estimate
    assert 0 < estimate < GIB and ok.get_json()["memory_estimate_bytes"] == estimate
    assert client.get(f"/v1/jobs/{ok.get_json()['id']}", headers=headers["member"]).get_json()["memory_estimate_bytes"] == estimate
    client.post("/signin", data={"key": keys["member"].key, "next": "/jobs"}, headers={"Sec-Fetch-Site": "same-origin"})
    page = client.get(f"/jobs/{ok.get_json()['id']}").get_data(as_text=True)
    assert f"{estimate / GIB:.2f} GiB" in page  # the job page shows the estimate
