"""Submit reads a Hub or S3 model's config.json (bounded, the job's own credentials) and refuses a job no worker holds.

The Hub is the stand-in of tests/support/hubserver.py over HTTP (no real Hub is reachable from tests);
S3 is a real moto_server.
"""

from __future__ import annotations

import json

import pytest

from quantfarm.memory import estimate_for_spec
from storage import farm
from storage import teams as team_store
from tests.api.conftest import RecordingDispatcher, counts, make_app
from tests.support.hubserver import HubServer
from tests.support.s3server import MotoServer

GIB = 1024**3
# A 405B-like shape: the estimate (~40 GiB) exceeds the only worker (24 GiB).
HUGE = {"model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
        "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}
SMALL = {**HUGE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 1000}
CAL = {"num_samples": 128, "seq_len": 512}


@pytest.fixture
def hub():
    with HubServer() as server:
        server.add_repo("org/huge", {"config.json": json.dumps(HUGE).encode()})
        server.add_repo("org/small", {"config.json": json.dumps(SMALL).encode()})
        server.add_repo("org/private-huge", {"config.json": json.dumps(HUGE).encode()}, private=True)
        server.add_token("hf_reader", write=False, read={"org/private-huge"})
        server.add_repo("org/padded", {"config.json": json.dumps(HUGE).encode() + b" " * 300_000})  # over the bound
        server.add_repo("org/deep", {"config.json": b"[" * 100_000 + b"]" * 100_000})  # nests past the parser's recursion
        server.add_repo("org/strings", {"config.json": json.dumps({**HUGE, "hidden_size": "16384"}).encode()})
        server.add_repo("org/heads", {"config.json": json.dumps({**HUGE, "num_attention_heads": "many"}).encode()})
        server.add_repo("org/list", {"config.json": b"[1, 2, 3]"})
        yield server


def _app(db, store, tmp_path, **settings):
    app = make_app(db, store, RecordingDispatcher(db), tmp_path, **settings)
    with db.session() as s:
        team_id = team_store.ensure_default_team(s)
        farm.register(s, "gpu-a:1:x", device="cuda:0", memory_bytes=24 * GIB, methods=["gptq"], formats=["gptq"],
                      engine_version="0.2.0", hostname="gpu-a")
    return app.test_client(), team_id


def _gptq(model):
    return {"model": model, "method": "gptq", "calibration": CAL}


def test_a_hub_model_too_big_for_every_worker_is_422_at_submit(db, store, tmp_path, hub):
    client, _ = _app(db, store, tmp_path, hf_endpoint=hub.endpoint)
    need = estimate_for_spec(HUGE, {"method": "gptq", "calibration": CAL})
    assert need > 24 * GIB
    before = counts(db)
    for model in ({"source": "hub", "repo_id": "org/huge"}, {"source": "hub", "repo_id": "org/private-huge", "token": "hf_reader"}):
        resp = client.post("/v1/jobs", json=_gptq(model))
        assert resp.status_code == 422, resp.get_json()
        err = resp.get_json()
        assert err["error"] == "too_large" and err["details"] == {"estimate_bytes": need, "largest_worker_bytes": 24 * GIB}
        assert f"{need / GIB:.1f} GiB" in err["message"] and "24.0 GiB" in err["message"]
    assert counts(db) == before  # nothing created
    # The private model read with the job's own token only: the stand-in saw it on that request.
    assert [tok for m, p, tok in hub.requests if "private-huge" in p] == ["hf_reader"]

    ok = client.post("/v1/jobs", json=_gptq({"source": "hub", "repo_id": "org/small"}))
    assert ok.status_code == 201 and ok.get_json()["memory_estimate_bytes"] == estimate_for_spec(SMALL, {"method": "gptq", "calibration": CAL})


@pytest.mark.parametrize("repo", ["org/private-huge", "org/padded", "org/deep", "org/strings", "org/heads", "org/list", "org/missing"])
def test_a_config_that_cannot_be_read_cheaply_queues_and_the_worker_estimates(db, store, tmp_path, hub, repo):
    """No access, over the size bound, hostile JSON, wrong types, no such repo: queued with no estimate (as before)."""
    client, _ = _app(db, store, tmp_path, hf_endpoint=hub.endpoint)
    resp = client.post("/v1/jobs", json=_gptq({"source": "hub", "repo_id": repo}))
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["status"] == "queued" and resp.get_json()["memory_estimate_bytes"] is None


def test_an_s3_model_is_estimated_with_the_teams_own_s3_credential(db, store, tmp_path):
    import boto3

    with MotoServer() as moto:
        client, team_id = _app(db, store, tmp_path, s3_endpoint_url=moto.url)
        s3 = boto3.client("s3", endpoint_url=moto.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="team-models")
        s3.put_object(Bucket="team-models", Key="huge/config.json", Body=json.dumps(HUGE).encode())
        s3.put_object(Bucket="team-models", Key="big/config.json", Body=b"{}" + b" " * 300_000)
        with db.session() as s:
            team_store.put_credential(s, team_id, "bucket", "s3", {"access_key_id": "testing", "secret_access_key": "testing"}, None)
        before = counts(db)
        resp = client.post("/v1/jobs", json=_gptq({"source": "s3", "uri": "s3://team-models/huge/", "credentials_ref": "bucket"}))
        assert resp.status_code == 422 and resp.get_json()["error"] == "too_large", resp.get_json()
        assert counts(db) == before
        for uri in ("s3://team-models/big/", "s3://team-models/nothing-here/"):
            resp = client.post("/v1/jobs", json=_gptq({"source": "s3", "uri": uri, "credentials_ref": "bucket"}))
            assert resp.status_code == 201 and resp.get_json()["memory_estimate_bytes"] is None, resp.get_json()
