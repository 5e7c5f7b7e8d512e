"""Artifact listing and downloads from a real LocalStore and a real S3 (moto_server); path traversal refused."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.conftest import test_keyring
import requests

from api.schemas import ArtifactList, FileList
from storage.artifacts import make_store
from storage.db import Database
from storage.models import Artifact, new_id
from tests.api.conftest import RecordingDispatcher, make_app
from tests.support.s3server import MotoServer, s3_settings_for

FILES = {
    "config.json": b'{"quantization_config": {"quant_method": "gptq", "bits": 4}}',
    "model.safetensors": os.urandom(70_000),
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


def _put_artifact(db, store, job_id, files=FILES, missing=()):
    """Write files where the worker puts them and record the artifacts row, as the runner does."""
    entries = []
    for path, data in files.items():
        if path not in missing:
            store.put_bytes(f"jobs/{job_id}/artifact/{path}", data)
        entries.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    art_id = new_id("art")
    with db.session() as s:
        s.add(Artifact(
            id=art_id, job_id=job_id, kind="model", format="gptq", location=store.uri(f"jobs/{job_id}/artifact"),
            files=entries, file_count=len(entries), size_bytes=sum(e["size"] for e in entries), sha256="ab" * 32,
        ))
    return art_id


@pytest.fixture
def artifact(db, store, submit):
    job_id = submit()["id"]
    return job_id, _put_artifact(db, store, job_id)


def test_file_list_has_sizes_and_sha256(client, artifact):
    job_id, art_id = artifact
    resp = client.get(f"/v1/artifacts/{art_id}/files")
    assert resp.status_code == 200
    listing = FileList.model_validate(resp.get_json())
    assert listing.artifact_id == art_id
    assert [(f.path, f.size, f.sha256) for f in listing.items] == [
        (p, len(d), hashlib.sha256(d).hexdigest()) for p, d in FILES.items()
    ]
    assert listing.items[2].url == f"/v1/artifacts/{art_id}/files/tokenizer/tokenizer.json"

    arts = ArtifactList.model_validate(client.get(f"/v1/jobs/{job_id}/artifacts").get_json()).items
    assert [(a.id, a.files, a.size_bytes) for a in arts] == [(art_id, 3, sum(len(d) for d in FILES.values()))]
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert [a["id"] for a in job["artifacts"]] == [art_id]
    assert [a["id"] for a in client.get("/v1/jobs").get_json()["items"][0]["artifacts"]] == [art_id]


def test_download_streams_exact_bytes(client, artifact):
    _, art_id = artifact
    for path in FILES:
        _check_download(client, art_id, path)


def _check_download(client, art_id, path):
    resp = client.get(f"/v1/artifacts/{art_id}/files/{path}")
    assert resp.status_code == 200
    assert resp.data == FILES[path]
    digest = hashlib.sha256(FILES[path]).hexdigest()
    assert resp.headers["Content-Length"] == str(len(FILES[path]))
    assert resp.headers["X-Checksum-SHA256"] == digest
    assert resp.headers["Content-Disposition"] == f"attachment; filename={path.rsplit('/', 1)[-1]}"
    again = client.get(f"/v1/artifacts/{art_id}/files/{path}", headers={"If-None-Match": f'"{digest}"'})
    assert again.status_code == 304 and again.data == b""


TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2F..%2F..%2Foutside.txt",
    "%2e%2e/%2e%2e/outside.txt",
    "tokenizer/../config.json",
    "./config.json",
]


def test_path_traversal_is_refused(client, artifact, tmp_path):
    _, art_id = artifact
    (tmp_path / "outside.txt").write_text("not yours")
    for path in TRAVERSALS:
        resp = client.get(f"/v1/artifacts/{art_id}/files/{path}")
        assert resp.status_code in (400, 404), path
        assert resp.get_json()["error"] in ("invalid_path", "not_found"), path
        assert b"not yours" not in resp.data and b"root:" not in resp.data


def test_dotdot_path_is_a_400_naming_the_problem(client, artifact):
    _, art_id = artifact
    resp = client.get(f"/v1/artifacts/{art_id}/files/tokenizer/../config.json")
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "invalid_path"


def test_unlisted_or_lost_files_are_404(client, db, store, submit):
    job_id = submit()["id"]
    art_id = _put_artifact(db, store, job_id, missing=("config.json",))
    resp = client.get(f"/v1/artifacts/{art_id}/files/nope.bin")
    assert resp.status_code == 404
    assert resp.get_json()["details"] == {"resource": "artifact_file", "id": art_id, "path": "nope.bin"}
    lost = client.get(f"/v1/artifacts/{art_id}/files/config.json")
    assert lost.status_code == 404 and "missing from the store" in lost.get_json()["message"]


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.mark.parametrize("presign", [False, True])
def test_s3_downloads_stream_or_redirect_to_a_presigned_url(moto, sqlite_url, tmp_path, presign):
    """A real S3Store against moto_server, a real S3 endpoint over HTTP."""
    settings = s3_settings_for(tmp_path, moto.url, presign_downloads=presign)
    store = make_store(settings)
    db = Database(sqlite_url, keyring=test_keyring())
    client = make_app(db, store, RecordingDispatcher(db), tmp_path, presign_downloads=presign).test_client()
    job_id = client.post("/v1/jobs", json={"model": {"source": "local", "path": "/m"}, "method": "rtn"}).get_json()["id"]
    art_id = _put_artifact(db, store, job_id)
    resp = client.get(f"/v1/artifacts/{art_id}/files/model.safetensors")
    if presign:
        assert resp.status_code == 302
        location = resp.headers["Location"]
        assert location.startswith(f"{moto.url}/{settings.s3_bucket}/jobs/{job_id}/artifact/model.safetensors?")
        assert requests.get(location, timeout=10).content == FILES["model.safetensors"]
    else:
        assert resp.status_code == 200
        assert resp.data == FILES["model.safetensors"]
    db.dispose()



def test_presigned_urls_use_the_public_endpoint_when_one_is_set(moto, sqlite_url, tmp_path):
    """The farm reaches S3 at one address, clients at another (here: the same server as localhost)."""
    public = moto.url.replace("127.0.0.1", "localhost")
    settings = s3_settings_for(tmp_path, moto.url, presign_downloads=True, s3_public_endpoint_url=public)
    store = make_store(settings)
    db = Database(sqlite_url, keyring=test_keyring())
    client = make_app(db, store, RecordingDispatcher(db), tmp_path, presign_downloads=True).test_client()
    job_id = client.post("/v1/jobs", json={"model": {"source": "local", "path": "/m"}, "method": "rtn"}).get_json()["id"]
    art_id = _put_artifact(db, store, job_id)  # written through the farm's own endpoint
    resp = client.get(f"/v1/artifacts/{art_id}/files/model.safetensors")
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert location.startswith(f"{public}/{settings.s3_bucket}/jobs/{job_id}/artifact/model.safetensors?")
    assert requests.get(location, timeout=10).content == FILES["model.safetensors"]
    db.dispose()
