"""A model folder cannot smuggle worker files into an artifact: links out, special files, index names that leave it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from quantfarm.errors import NotAModel
from quantfarm.settings import Settings
from quantfarm.store import walk_files
from storage.artifacts import LocalStore
from tests.workers.test_runner import load, submit
from workers.engine.export import copy_tokenizer
from workers.engine.shards import ShardReader
from workers.runner import JobRunner

SECRET = "root:x:0:0:worker-secret"


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside" / "passwd"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def test_export_copies_only_regular_files_inside_the_model_folder(tiny_llama, tmp_path, outside):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny_llama, src)
    out.mkdir()
    for name in ("merges.txt", "vocab.json", "tokenizer.model", "chat_template.jinja"):
        (src / name).unlink(missing_ok=True)
    (src / "merges.txt").symlink_to(outside)  # merges.txt -> /etc/passwd, as reproduced
    os.mkfifo(src / "tokenizer.model")
    (src / "chat_template.jinja").symlink_to(src / "tokenizer_config.json")  # stays inside: its bytes are copied
    copied = copy_tokenizer(src, out)
    assert "merges.txt" not in copied and "tokenizer.model" not in copied and "chat_template.jinja" in copied
    assert not (out / "merges.txt").exists() and not (out / "tokenizer.model").exists()
    assert not (out / "chat_template.jinja").is_symlink()
    assert (out / "chat_template.jinja").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert all(SECRET not in p.read_text(errors="replace") for p in walk_files(out))


def test_a_job_on_a_folder_linking_out_fails_and_stores_nothing(env, tiny_llama, tmp_path, outside):
    settings, db, store = env
    src = tmp_path / "linked"
    shutil.copytree(tiny_llama, src)
    (src / "merges.txt").unlink(missing_ok=True)
    (src / "merges.txt").symlink_to(outside)
    job_id = submit(db, {"model": {"source": "local", "path": str(src)}, "method": "rtn"})
    assert JobRunner(settings, db, store).run(job_id) == "failed"
    job, _, arts = load(db, job_id)
    assert job.error_code == "model_not_found" and "merges.txt is a symlink to a file outside the model folder" in job.error_message
    assert arts == [] and all(SECRET.encode() not in store.get_bytes(k) for k in store.list(""))


def test_a_job_outside_the_local_roots_fails_on_the_worker(env, db, tiny_llama, tmp_path):
    _, _, store = env
    settings = Settings(home=tmp_path / "home", local_roots=[tmp_path / "models"])
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"})
    assert JobRunner(settings, db, store).run(job_id) == "failed"
    job, _, arts = load(db, job_id)
    assert job.error_code == "model_not_found" and arts == []
    assert job.error_message.endswith(f"must be a folder under one of the local roots ({tmp_path / 'models'}).")


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd", "a//b.safetensors", 7])
def test_a_shard_index_naming_files_outside_the_folder_is_not_a_model(tiny_llama, tmp_path, shard):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NotAModel) as err:
        ShardReader(src)
    assert err.value.message == f"model.safetensors.index.json names shard {shard!r}, which is not a file inside the model folder."


@pytest.fixture
def env(db, tmp_path):
    return Settings(home=tmp_path / "home", lease_seconds=30), db, LocalStore(tmp_path / "store")
