"""Fetching models: local paths, ``s3://`` prefixes on a real moto_server, and the Hub.

The Hub is unreachable from this machine: the real ``huggingface_hub`` client
talks to the stand-in of tests/support/hubserver.py over HTTP instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from quantfarm.errors import ModelNotFound, NotAModel, StorageUnavailable, ValidationFailed
from quantfarm.settings import Settings
from quantfarm.store import sha256_file, walk_files
from storage.s3 import S3Store
from storage.sources import ModelCache, check_local_path, fetch, fetch_model, model_cache_dir
from tests.support.hubserver import HubServer
from tests.support.s3server import free_port, s3_settings_for

TOKEN = "hf_READtoken_secret_777"
# A job's own S3 credential (a team credential by reference); without one a bucket is read unsigned.
KEYS = {"model.s3": {"access_key_id": "testing", "secret_access_key": "testing"}}


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in walk_files(root)}


# --- local ----------------------------------------------------------------------------------


def test_local_directory_is_read_in_place(tiny_llama, tmp_path, s3_settings):
    got = fetch_model({"source": "local", "path": str(tiny_llama)}, {}, s3_settings, tmp_path / "scratch")
    assert got == tiny_llama.resolve() and not (tmp_path / "scratch").exists()
    for bad in (tmp_path / "missing", tiny_llama / "config.json"):
        with pytest.raises(ModelNotFound) as err:
            fetch_model({"source": "local", "path": str(bad)}, {}, s3_settings, tmp_path / "scratch")
        assert err.value.message == f"Model path {bad}: no such directory on this worker."


def test_local_roots_are_checked_with_symlinks_resolved(tiny_llama, tmp_path):
    """Submit-side check (the API calls it) and the worker's second check agree; a link out of a root is refused."""
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    (root / "escape").symlink_to(tiny_llama)  # inside the root by name, outside once resolved
    assert check_local_path(str(root / "a"), [root]) == (root / "a").resolve()
    assert check_local_path(str(root / "a" / ".." / "a"), [root]) == (root / "a").resolve()
    assert check_local_path(str(root) + "/", [root]) == root.resolve()  # the root itself
    assert check_local_path(str(root / "a"), [Path("/")]) == (root / "a").resolve()  # "/" holds every absolute path
    (tmp_path / "models2" / "a").mkdir(parents=True)  # the root's name as a prefix of a sibling's is not inside it
    for bad in ("/etc", str(root / ".." / "elsewhere"), str(root / "escape"), "relative/dir", "/models/a\x00b",
                str(tmp_path / "models2" / "a"), str(tmp_path / "models2")):
        with pytest.raises(ValidationFailed) as err:
            check_local_path(bad, [root])
        assert err.value.fields == {"model.path": f"must be a folder under one of the local roots ({root})"}
    with pytest.raises(ValidationFailed) as err:
        check_local_path(str(root / "a"), [])
    assert "QUANTFARM_LOCAL_ROOTS" in err.value.fields["model.path"]

    settings = Settings(home=tmp_path / "home", local_roots=[root])
    with pytest.raises(ModelNotFound) as err:
        fetch_model({"source": "local", "path": str(root / "escape")}, {}, settings, tmp_path / "s")
    assert err.value.message == (f"Model path {root / 'escape'} is refused on this worker: "
                                 f"must be a folder under one of the local roots ({root}).")
    with pytest.raises(ModelNotFound, match="QUANTFARM_LOCAL_ROOTS"):
        fetch_model({"source": "local", "path": str(tiny_llama)}, {}, Settings(home=tmp_path / "home", local_roots=[]), tmp_path / "s")


@pytest.mark.parametrize("plant", ["outside-link", "fifo", "dangling-link"])
def test_local_folder_with_a_link_out_or_a_special_file_is_refused(plant, tiny_llama, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    (model / "merges.txt").unlink(missing_ok=True)
    if plant == "outside-link":
        (model / "merges.txt").symlink_to("/etc/passwd")
    elif plant == "fifo":
        os.mkfifo(model / "merges.txt")
    else:
        (model / "merges.txt").symlink_to(model / "gone")
    (model / "inside.json").symlink_to(model / "config.json")  # a link that stays in the folder is fine
    settings = Settings(home=tmp_path / "home", local_roots=[tmp_path])
    with pytest.raises(ModelNotFound) as err:
        fetch_model({"source": "local", "path": str(model)}, {}, settings, tmp_path / "s")
    assert err.value.details == {"file": "merges.txt"}
    (model / "merges.txt").unlink()
    assert fetch_model({"source": "local", "path": str(model)}, {}, settings, tmp_path / "s") == model.resolve()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_shard_index_naming_another_models_files_is_not_a_model(kind, tiny_llama, tmp_path, s3_settings):
    """Every loader (ours, transformers' for bitsandbytes) joins the index's names to the folder: ../ would read
    another model on the worker's disk, another team's cached private one say, into this job's artifact."""
    src = tmp_path / "m"
    shutil.copytree(tiny_llama, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    stolen = "../../other-team-model/model.safetensors"
    index["weight_map"][first] = stolen
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    if kind == "local":
        source = {"source": "local", "path": str(src)}
    else:
        S3Store.from_settings(s3_settings, bucket="index-models", create_bucket=True).upload_dir("m", src)
        source = {"source": "s3", "uri": "s3://index-models/m"}
    with pytest.raises(NotAModel) as err:
        fetch_model(source, KEYS, s3_settings, tmp_path / "scratch")
    assert err.value.message == f"model.safetensors.index.json names shard {stolen!r}, which is not a file inside the model folder."


# --- s3 ----------------------------------------------------------------------------------------


def test_s3_prefix_is_fetched_cached_and_refetched_when_it_changes(tiny_llama, tmp_path, s3_settings):
    bucket = S3Store.from_settings(s3_settings, bucket="team-models", create_bucket=True)
    bucket.upload_dir("llama/v1", tiny_llama)
    bucket.put_bytes("llama/v10/other.bin", b"not part of v1")
    source = {"source": "s3", "uri": "s3://team-models/llama/v1/"}

    first = fetch(source, KEYS, s3_settings, tmp_path / "scratch")
    assert tree(first.path) == tree(tiny_llama) and first.source == "s3"
    assert first.path.parent == model_cache_dir(s3_settings)
    again = fetch(source, KEYS, s3_settings, tmp_path / "scratch2")
    assert again == first  # same listing, same cache entry, nothing downloaded twice

    bucket.put_bytes("llama/v1/config.json", b'{"changed": true}')
    changed = fetch(source, KEYS, s3_settings, tmp_path / "scratch3")
    assert changed.path != first.path and (changed.path / "config.json").read_bytes() == b'{"changed": true}'


def test_s3_without_cache_downloads_into_scratch(tiny_llama, tmp_path, moto):
    settings = s3_settings_for(tmp_path, moto.url, model_cache_bytes=0)
    S3Store.from_settings(settings, bucket="nocache-models", create_bucket=True).upload_dir("m", tiny_llama)
    got = fetch_model({"source": "s3", "uri": "s3://nocache-models/m"}, KEYS, settings, tmp_path / "scratch")
    assert got == tmp_path / "scratch" / "model" and tree(got) == tree(tiny_llama)
    assert not model_cache_dir(settings).exists()


@pytest.mark.parametrize("cache", [True, False])
def test_s3_keys_that_leave_the_model_folder_refuse_the_job_and_write_nothing(cache, tmp_path, moto):
    """Keys like ``m/../../../../tmp/X/f`` or ``m//tmp/X/f`` once wrote wherever they pointed."""
    settings = s3_settings_for(tmp_path, moto.url, model_cache_bytes=(1 << 30) if cache else 0)
    escaped = tmp_path / "escaped"
    evil = {
        "dotdot": "m/" + "../" * 40 + str(escaped / "dotdot" / "f").lstrip("/"),
        "empty": "m//" + str(escaped / "empty" / "f").lstrip("/"),
    }
    for name, key in evil.items():
        bucket = S3Store.from_settings(settings, bucket=f"evil-{name}-{int(cache)}", create_bucket=True)
        bucket.put_bytes("m/config.json", b"{}")
        bucket.put_bytes(key, b"pwned")
        assert key in bucket.list("m")  # the store really holds the key as written
        with pytest.raises(ModelNotFound) as err:
            fetch_model({"source": "s3", "uri": f"s3://evil-{name}-{int(cache)}/m"}, KEYS, settings, tmp_path / "scratch")
        assert err.value.details == {"key": key} and repr(key) in err.value.message
        assert err.value.message.startswith(f"Refusing the model at s3://evil-{name}-{int(cache)}/m: object key ")
    assert not escaped.exists()
    written = [p for p in walk_files(tmp_path) if p.name == "f"]
    assert written == []


def test_an_s3_source_is_read_with_the_jobs_keys_or_unsigned_never_the_farms(tiny_llama, tmp_path, s3_proxy, faulty_s3_settings):
    """The proxy in front of moto_server records each request's Authorization header."""
    settings = faulty_s3_settings.model_copy(update={"model_cache_bytes": 0})
    public = S3Store.from_settings(settings, bucket="anon-models", create_bucket=True)
    public.upload_dir("m", tiny_llama)
    public.client.put_bucket_policy(Bucket="anon-models", Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": ["arn:aws:s3:::anon-models", "arn:aws:s3:::anon-models/*"]}]}))
    s3_proxy.authorizations.clear()
    got = fetch_model({"source": "s3", "uri": "s3://anon-models/m"}, {}, settings, tmp_path / "a")
    assert tree(got) == tree(tiny_llama)
    assert s3_proxy.authorizations and set(s3_proxy.authorizations) == {None}  # unsigned, not the farm's "testing" key
    s3_proxy.authorizations.clear()
    team = {"access_key_id": "TEAMKEY", "secret_access_key": "team-secret"}
    fetch_model({"source": "s3", "uri": "s3://anon-models/m"}, {"model.s3": team}, settings, tmp_path / "b")
    assert s3_proxy.authorizations and all("Credential=TEAMKEY/" in (a or "") for a in s3_proxy.authorizations)


def test_s3_missing_prefix_or_bucket_is_model_not_found(tmp_path, s3_settings):
    S3Store.from_settings(s3_settings, bucket="empty-models", create_bucket=True).ensure_bucket()
    with pytest.raises(ModelNotFound, match=r"^No objects under s3://empty-models/nothing/; check the bucket and prefix\.$"):
        fetch_model({"source": "s3", "uri": "s3://empty-models/nothing/"}, KEYS, s3_settings, tmp_path)
    with pytest.raises(ModelNotFound, match="Cannot read the model at s3://no-such-bucket-xyz/m: Bucket 'no-such-bucket-xyz' does not exist"):
        fetch_model({"source": "s3", "uri": "s3://no-such-bucket-xyz/m"}, KEYS, s3_settings, tmp_path)


def test_s3_endpoint_down_is_storage_unavailable(tmp_path):
    settings = s3_settings_for(tmp_path, f"http://127.0.0.1:{free_port()}", s3_max_attempts=2)
    with pytest.raises(StorageUnavailable, match="is unavailable"):
        fetch_model({"source": "s3", "uri": "s3://team-models/llama/"}, KEYS, settings, tmp_path)


# --- the Hub ------------------------------------------------------------------------------------


@pytest.fixture
def hub(tiny_llama):
    with HubServer() as server:
        files = {p.relative_to(tiny_llama).as_posix(): p.read_bytes() for p in walk_files(tiny_llama)}
        files.update({"original/consolidated.pth": b"pickle", "README.md": b"# card", "onnx/model.onnx": b"onnx"})
        server.first = server.add_repo("org/tiny-llama", files)
        server.add_token(TOKEN, write=False, read={"org/private-llama", "org/gated-llama"})
        yield server


def hub_settings(hub, tmp_path, **kw):
    from quantfarm.settings import Settings

    return Settings(**{"home": tmp_path / "home", "hf_endpoint": hub.endpoint, **kw})


def test_hub_model_is_fetched_with_only_what_a_model_needs(hub, tiny_llama, tmp_path):
    settings = hub_settings(hub, tmp_path)
    got = fetch({"source": "hub", "repo_id": "org/tiny-llama"}, {}, settings, tmp_path / "s")
    assert got.revision == hub.first and got.path.name.endswith(f"--{hub.first}")
    assert tree(got.path) == tree(tiny_llama)  # no README, original/, onnx/, nor .cache
    gets = lambda: [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]  # noqa: E731
    n = len(gets())
    assert fetch({"source": "hub", "repo_id": "org/tiny-llama"}, {}, settings, tmp_path / "s2") == got
    assert len(gets()) == n  # served from the worker's cache


def test_a_job_without_a_token_never_sends_the_workers_own(hub, tiny_llama, tmp_path, monkeypatch):
    """With HF_TOKEN in the worker's environment, a tokenless job sends no Authorization at all."""
    ambient = "hf_FARMS_OWN_token_must_not_leak"
    hub.add_token(ambient, write=True, read={"org/private-llama"})
    hub.add_repo("org/private-llama", {p.relative_to(tiny_llama).as_posix(): p.read_bytes() for p in walk_files(tiny_llama)},
                 private=True)
    monkeypatch.setenv("HF_TOKEN", ambient)
    settings = hub_settings(hub, tmp_path, model_cache_bytes=0)
    fetch({"source": "hub", "repo_id": "org/tiny-llama"}, {}, settings, tmp_path / "a")
    with pytest.raises(ModelNotFound, match="no token was given"):
        fetch({"source": "hub", "repo_id": "org/private-llama"}, {}, settings, tmp_path / "b")
    assert hub.requests and {tok for _, _, tok in hub.requests} == {None}
    n = len(hub.requests)
    fetch({"source": "hub", "repo_id": "org/private-llama"}, {"model.token": TOKEN}, settings, tmp_path / "c")
    assert {tok for _, _, tok in hub.requests[n:]} == {TOKEN}  # the job's own token, and only it


def test_hub_revision_is_honoured_and_keys_the_cache(hub, tmp_path):
    settings = hub_settings(hub, tmp_path)
    second = hub.repos["org/tiny-llama"].commit("main", "new config", {"config.json": b'{"v": 2}'}).sha
    new = fetch({"source": "hub", "repo_id": "org/tiny-llama"}, {}, settings, tmp_path / "a")
    old = fetch({"source": "hub", "repo_id": "org/tiny-llama", "revision": hub.first}, {}, settings, tmp_path / "b")
    assert (new.revision, old.revision) == (second, hub.first) and new.path != old.path
    assert (new.path / "config.json").read_bytes() == b'{"v": 2}'
    assert (old.path / "config.json").read_bytes() != b'{"v": 2}'
    with pytest.raises(ModelNotFound, match=r"^Hub model org/tiny-llama has no revision 'v9'\.$"):
        fetch_model({"source": "hub", "repo_id": "org/tiny-llama", "revision": "v9"}, {}, settings, tmp_path)


def test_hub_token_access_and_clear_refusals(hub, tiny_llama, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    settings = hub_settings(hub, tmp_path)
    files = {p.relative_to(tiny_llama).as_posix(): p.read_bytes() for p in walk_files(tiny_llama)}
    hub.add_repo("org/private-llama", files, private=True)
    hub.add_repo("org/gated-llama", files, gated=True)
    hub.add_repo("org/other-gated", files, gated=True)

    got = fetch_model({"source": "hub", "repo_id": "org/private-llama"}, {"model.token": TOKEN}, settings, tmp_path)
    assert tree(got) == tree(tiny_llama)
    assert {tok for _m, p, tok in hub.requests if "private-llama" in p} == {TOKEN}
    assert fetch_model({"source": "hub", "repo_id": "org/gated-llama"}, {"model.token": TOKEN}, settings, tmp_path).is_dir()

    cases = [
        ("org/private-llama", None, "Hub model org/private-llama was not found, or it is private and no token was given (set model.token)."),
        ("org/missing", TOKEN, "Hub model org/missing was not found, or it is private and the job's token lacks access to it."),
        ("org/other-gated", TOKEN, "Hub model org/other-gated is gated and the job's token lacks access to it; accept its terms on the Hub with the token's account."),
    ]
    for repo, token, message in cases:
        with pytest.raises(ModelNotFound) as err:
            fetch_model({"source": "hub", "repo_id": repo}, {"model.token": token} if token else {}, settings, tmp_path)
        assert err.value.message == message and err.value.code == "model_not_found"
    assert TOKEN not in caplog.text


def test_hub_errors_and_outages(hub, tmp_path):
    settings = hub_settings(hub, tmp_path)
    hub.fail_next("/api/models/org/tiny-llama", 1, 500)
    with pytest.raises(StorageUnavailable, match=f"The Hugging Face Hub at {hub.endpoint} answered HTTP 500 for org/tiny-llama"):
        fetch_model({"source": "hub", "repo_id": "org/tiny-llama"}, {}, settings, tmp_path)
    down = hub_settings(hub, tmp_path, hf_endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match="is unreachable \\(ConnectError\\)"):
        fetch_model({"source": "hub", "repo_id": "org/tiny-llama"}, {}, down, tmp_path)
    hub.add_repo("org/not-a-model", {"README.md": b"# docs only", "config.json": b"{}"})
    with pytest.raises(NotAModel, match="has no .safetensors weights"):
        fetch_model({"source": "hub", "repo_id": "org/not-a-model"}, {}, settings, tmp_path)
    assert not [p for p in model_cache_dir(settings).iterdir() if p.is_dir()]  # no half entries left


# --- the cache -------------------------------------------------------------------------------------


def _filler(size: int):
    def fill(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"\0" * size)

    return fill


def _age(cache: ModelCache, key: str, t: float) -> None:
    os.utime(cache.root / f"{key}.lock", (t, t))


def test_cache_evicts_least_recently_used_but_never_a_held_entry(tmp_path):
    cache = ModelCache(tmp_path / "cache", limit=1000)
    cache.get("a", _filler(400))
    _age(cache, "a", 1000)
    cache.get("b", _filler(400))
    _age(cache, "b", 2000)
    cache.get("a", _filler(400))  # a hit: a is now the most recent
    _age(cache, "a", 3000)
    cache.get("c", _filler(400))  # 1200 bytes > 1000: the least recently used (b) goes
    assert sorted(k for _, k, _ in cache.entries()) == ["a", "c"]

    with contextlib.ExitStack() as hold:
        _age(cache, "a", 100)  # the oldest, but a job holds it
        cache.get("a", _filler(400), hold)
        _age(cache, "a", 100)
        _age(cache, "c", 200)
        cache.get("d", _filler(400))
        assert sorted(k for _, k, _ in cache.entries()) == ["a", "d"]  # c went instead
    cache.get("e", _filler(700))  # over the limit again, nothing held: only e stays
    assert [k for _, k, _ in cache.entries()] == ["e"]


def test_cache_fill_failure_leaves_no_entry(tmp_path):
    cache = ModelCache(tmp_path / "cache", limit=10_000)

    def broken(tmp: Path) -> None:
        (tmp / "partial.safetensors").write_bytes(b"half")
        raise StorageUnavailable("endpoint went away")

    with pytest.raises(StorageUnavailable):
        cache.get("m", broken)
    assert cache.entries() == [] and [p.name for p in cache.root.iterdir()] == ["m.lock"]
    assert (cache.get("m", _filler(10)) / "model.safetensors").stat().st_size == 10
