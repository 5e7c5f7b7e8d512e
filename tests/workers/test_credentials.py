"""A spec's credentials_ref reaches the worker: the team's stored token is what the Hub sees.

The Hub is the in-process stand-in of tests/support/hubserver.py (the real one is unreachable
here); it records the Authorization header of every request.
"""

from __future__ import annotations

import pytest

from quantfarm.settings import Settings
from quantfarm.spec import parse_spec, public_spec, spec_secrets
from quantfarm.store import walk_files
from storage import jobs
from storage import teams as team_store
from storage.artifacts import LocalStore
from storage.models import Credential
from tests.support.hubserver import HubServer
from workers.runner import JobRunner

STORED = "hf_TEAM_credential_token_9"
CAL = {"num_samples": 4, "seq_len": 64}


@pytest.fixture
def hub(tiny_llama):
    with HubServer() as server:
        server.add_repo("org/private-llama", {p.relative_to(tiny_llama).as_posix(): p.read_bytes() for p in walk_files(tiny_llama)},
                        private=True)
        server.add_token(STORED, write=False, read={"org/private-llama"})
        yield server


def _submit(db, team_id: str) -> str:
    spec = parse_spec({"model": {"source": "hub", "repo_id": "org/private-llama", "credentials_ref": "hub-read"},
                       "method": "rtn", "calibration": CAL})
    with db.session() as s:
        return jobs.create_job(s, method="rtn", model_ref="t", spec=public_spec(spec), secrets=spec_secrets(spec), team_id=team_id).id


def test_a_team_credential_is_used_by_name_and_only_it(db, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FARMS_OWN_must_not_be_sent")
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.endpoint, model_cache_bytes=0, lease_seconds=30)
    with db.session() as s:
        team = team_store.create_team(s, "nlp").id
        team_store.put_credential(s, team, "hub-read", "hub", {"token": STORED}, None)
    job_id = _submit(db, team)
    assert JobRunner(settings, db, LocalStore(tmp_path / "store")).run(job_id) == "succeeded"
    assert {tok for _m, p, tok in hub.requests if "private-llama" in p} == {STORED}


def test_a_credential_deleted_after_submit_fails_the_job_clearly(db, hub, tmp_path):
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.endpoint, model_cache_bytes=0, lease_seconds=30)
    with db.session() as s:
        team = team_store.create_team(s, "nlp").id
        team_store.put_credential(s, team, "hub-read", "hub", {"token": STORED}, None)
        other = team_store.create_team(s, "other").id
        team_store.put_credential(s, other, "hub-read", "hub", {"token": "hf_other_teams"}, None)
    job_id = _submit(db, team)
    with db.session() as s:
        s.query(Credential).filter(Credential.team_id == team).delete()
    assert JobRunner(settings, db, LocalStore(tmp_path / "store")).run(job_id) == "failed"
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.error_code == "credential_missing" and "hub-read" in job.error_message
    assert not [p for _m, p, _t in hub.requests if "private-llama" in p]  # another team's same-named credential is never used
