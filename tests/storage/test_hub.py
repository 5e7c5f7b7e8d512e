"""Publishing to the Hub: the real ``huggingface_hub`` client against a local stand-in.

The Hugging Face Hub is unreachable from this machine, so
tests/support/hubserver.py stands in for it over real HTTP and records what
was uploaded. The artifact is a real RTN export of the tiny Llama by the
engine, card and all.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from quantfarm.errors import PublishError, StorageUnavailable
from quantfarm.settings import Settings
from quantfarm.spec import Calibration, HubDestination, RTNOptions
from storage.artifacts import LocalStore
from storage.hub import card_metadata, publish_to_hub
from tests.support.hubserver import HubServer
from tests.support.s3server import free_port

TOKEN = "hf_WRITEtoken_never_logged_42"


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory) -> Path:
    """A real engine output: RTN 4-bit of the tiny Llama, with config, card and tokenizer."""
    from workers.engine.pipeline import QuantizeRequest
    from workers.engine.run import quantize

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("artifact")
    req = QuantizeRequest(source_dir=tiny_llama, method="rtn", options=RTNOptions(group_size=32),
                          calibration=Calibration(), base_model="org/tiny-llama")
    quantize(req, LocalStore(root / "ckpt"), root / "out", device=torch.device("cpu"))
    return root / "out"


@pytest.fixture
def out(artifact, tmp_path) -> Path:
    """A private copy of the artifact a test may alter."""
    return Path(shutil.copytree(artifact, tmp_path / "out"))


@pytest.fixture
def hub():
    with HubServer() as server:
        server.add_token(TOKEN, write=True)
        yield server


def settings_for(hub, tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", hf_endpoint=hub.endpoint)


def test_publish_creates_a_private_repo_with_every_file(out, hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    url, commit = publish_to_hub(out, HubDestination(repo_id="team/tiny-rtn"), TOKEN, "job_01abc", settings_for(hub, tmp_path))

    assert url == f"{hub.endpoint}/team/tiny-rtn" and commit == hub.repos["team/tiny-rtn"].branches["main"]
    assert hub.created == [{"name": "tiny-rtn", "organization": "team", "visibility": "private"}]
    assert hub.repos["team/tiny-rtn"].private
    remote = hub.files("team/tiny-rtn")
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert any(k.endswith(".safetensors") for k in remote)
    (upload,) = hub.uploads
    assert upload.message == "Quantfarm job job_01abc: gptq 4-bit" and upload.commit == commit

    config = json.loads(remote["config.json"])
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 32)
    meta = card_metadata(remote["README.md"].decode())
    assert meta["base_model"] == "org/tiny-llama"
    assert (meta["library_name"], meta["pipeline_tag"]) == ("transformers", "text-generation")
    assert {"rtn", "gptq", "4-bit"} <= set(meta["tags"])
    assert "from_pretrained" in remote["README.md"].decode()  # how to load it
    # Every request carried the token; no log line did.
    assert {tok for _m, _p, tok in hub.requests} == {TOKEN}
    assert TOKEN not in caplog.text


def test_publishing_without_quantization_config_uploads_nothing(out, hub, tmp_path):
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(PublishError) as err:
        publish_to_hub(out, HubDestination(repo_id="team/garbage"), TOKEN, "job_1", settings_for(hub, tmp_path))
    assert err.value.code == "publish_failed"
    assert "config.json has no quantization_config" in err.value.message and "#1211" in err.value.message
    assert hub.requests == [] and hub.repos == {}


def test_card_without_hub_metadata_is_refused(out, hub, tmp_path):
    (out / "README.md").write_text("# a model\n\nNo YAML header.\n")
    with pytest.raises(PublishError, match=r"lacks Hub metadata \(library_name, pipeline_tag, tags: gptq, tags: 4-bit\)"):
        publish_to_hub(out, HubDestination(repo_id="team/x"), TOKEN, "job_1", settings_for(hub, tmp_path))
    assert hub.requests == []


def test_branch_of_an_existing_repo_and_an_idempotent_republish(out, hub, tmp_path):
    first = hub.add_repo("team/tiny-rtn", {"notes.txt": b"keep me"}, private=True)
    dest = HubDestination(repo_id="team/tiny-rtn", branch="v1-4bit")
    url, commit = publish_to_hub(out, dest, TOKEN, "job_2", settings_for(hub, tmp_path))
    repo = hub.repos["team/tiny-rtn"]
    assert url == f"{hub.endpoint}/team/tiny-rtn/tree/v1-4bit"
    assert repo.branches["main"] == first and repo.branches["v1-4bit"] == commit
    assert "config.json" in hub.files("team/tiny-rtn", "v1-4bit") and "config.json" not in hub.files("team/tiny-rtn")
    assert hub.uploads[0].branch == "v1-4bit"
    # Publishing the same bytes again (a retried job) makes no new commit.
    again = publish_to_hub(out, dest, TOKEN, "job_2", settings_for(hub, tmp_path))
    assert again == (url, commit) and len(hub.uploads) == 1


def test_a_public_repo_is_not_used_for_a_private_result(out, hub, tmp_path):
    hub.add_repo("team/public", {"README.md": b"hi"}, private=False)
    with pytest.raises(PublishError, match="already exists and is public"):
        publish_to_hub(out, HubDestination(repo_id="team/public", private=True), TOKEN, "job_3", settings_for(hub, tmp_path))
    assert hub.uploads == []


def test_a_card_naming_an_s3_base_model_is_fixed_for_the_hub(out, hub, tmp_path):
    readme = (out / "README.md").read_text().replace('base_model: "org/tiny-llama"', 'base_model: "s3://models/llama/"')
    (out / "README.md").write_text(readme)
    publish_to_hub(out, HubDestination(repo_id="team/from-s3"), TOKEN, "job_4", settings_for(hub, tmp_path))
    remote = hub.files("team/from-s3")
    meta = card_metadata(remote["README.md"].decode())
    assert "base_model" not in meta and {"gptq", "4-bit"} <= set(meta["tags"])
    assert (out / "README.md").read_text() == readme  # the artifact itself is untouched
    assert remote["config.json"] == (out / "config.json").read_bytes()
    assert not any(p.name.startswith(".hub-") for p in out.parent.iterdir())  # staging removed


def test_server_errors_are_retried(out, hub, tmp_path):
    hub.fail_next("/api/repos/create", 2, 503)
    hub.fail_next("/commit/", 1, 502)  # huggingface_hub retries commits itself too
    url, commit = publish_to_hub(out, HubDestination(repo_id="team/flaky"), TOKEN, "job_5", settings_for(hub, tmp_path), backoff=0.01)
    creates = [p for m, p, _ in hub.requests if p == "/api/repos/create"]
    assert len(creates) == 3 and commit == hub.repos["team/flaky"].branches["main"]
    assert "config.json" in hub.files("team/flaky")


def test_a_hub_that_keeps_failing_is_storage_unavailable(out, hub, tmp_path):
    hub.fail_next("/api/repos/create", 10, 503)
    with pytest.raises(StorageUnavailable) as err:
        publish_to_hub(out, HubDestination(repo_id="team/down"), TOKEN, "job_6", settings_for(hub, tmp_path), attempts=3, backoff=0.01)
    assert err.value.message == (
        f"The Hugging Face Hub at {hub.endpoint} kept failing during create_repo (HTTP 503) after 3 attempts; retry the job later."
    )
    assert hub.uploads == []
    closed = Settings(home=tmp_path / "h2", hf_endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match="ConnectError"):
        publish_to_hub(out, HubDestination(repo_id="team/down"), TOKEN, "job_6", closed, attempts=2, backoff=0.01)


def test_a_token_without_write_access_is_refused(out, hub, tmp_path):
    hub.add_token("hf_readonly", write=False)
    with pytest.raises(PublishError) as err:
        publish_to_hub(out, HubDestination(repo_id="team/nope"), "hf_readonly", "job_7", settings_for(hub, tmp_path))
    assert "lacks write access" in err.value.message and "hf_readonly" not in err.value.message
    assert hub.repos == {}


def test_publish_without_a_token_never_uses_the_workers_own(out, hub, tmp_path, monkeypatch):
    """HF_TOKEN on the worker can write anywhere the farm's account can; a tokenless job must not borrow it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(PublishError, match="the destination token lacks write access"):
        publish_to_hub(out, HubDestination(repo_id="team/borrowed"), None, "job_01abc", settings_for(hub, tmp_path))
    assert hub.created == [] and "team/borrowed" not in hub.repos
    assert hub.requests and {tok for _, _, tok in hub.requests} == {None}


def _local(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_large_output_goes_up_in_pieces_weights_first_and_the_card_last(out, hub, tmp_path):
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.endpoint, hub_commit_bytes=1)  # every file a piece
    url, commit = publish_to_hub(out, HubDestination(repo_id="team/pieces"), TOKEN, "job_8", settings)
    local = _local(out)
    assert [len(u.files) for u in hub.uploads] == [1] * len(local)
    assert sorted(hub.received) == sorted(local)  # each file sent once
    assert hub.received[0].endswith(".safetensors") and hub.received[-2:] == ["config.json", "README.md"]
    n = len(local)
    assert [u.message for u in hub.uploads] == [f"Quantfarm job job_8: gptq 4-bit (part {i} of {n})" for i in range(1, n)] + [
        "Quantfarm job job_8: gptq 4-bit"]
    assert commit == hub.uploads[-1].commit == hub.repos["team/pieces"].branches["main"]
    assert {k: v for k, v in hub.files("team/pieces").items() if k != ".gitattributes"} == local


@pytest.mark.parametrize("landed", [False, True], ids=["lost-before-landing", "landed-answer-lost"])
def test_a_publish_dropped_half_way_resumes_without_resending_what_landed(out, hub, tmp_path, landed, caplog):
    caplog.set_level(logging.INFO)
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.endpoint, hub_commit_bytes=1)
    hub.drop_after_files(2, landed=landed)  # the connection breaks at the third file's commit
    url, commit = publish_to_hub(out, HubDestination(repo_id="team/resumed"), TOKEN, "job_9", settings, backoff=0.01)
    local = _local(out)
    assert hub.dropped == 1
    assert sorted(hub.received) == sorted(local)  # nothing sent twice, nothing missing
    assert {k: v for k, v in hub.files("team/resumed").items() if k != ".gitattributes"} == local
    assert commit == hub.repos["team/resumed"].branches["main"]
    assert any("hub upload failed" in r.getMessage() for r in caplog.records)
    if landed:  # the retry saw the landed file on the branch and skipped it
        assert any("already on the Hub; not sent again" in r.getMessage() for r in caplog.records)


def test_a_retried_job_publishes_only_what_an_earlier_attempt_did_not(out, hub, tmp_path):
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.endpoint, hub_commit_bytes=1)
    hub.drop_after_files(3, times=10)  # the Hub stays unreachable after three files: the attempt gives up
    dest = HubDestination(repo_id="team/later")
    with pytest.raises(StorageUnavailable, match="kept failing during upload"):
        publish_to_hub(out, dest, TOKEN, "job_10", settings, attempts=2, backoff=0.01)
    first = list(hub.received)
    assert len(first) == 3
    hub._drop = None  # the Hub is back; the job is retried
    url, commit = publish_to_hub(out, dest, TOKEN, "job_10", settings, backoff=0.01)
    local = _local(out)
    assert hub.received[:3] == first and sorted(hub.received) == sorted(local)
    assert {k: v for k, v in hub.files("team/later").items() if k != ".gitattributes"} == local
