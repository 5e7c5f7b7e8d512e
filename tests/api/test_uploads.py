"""Calibration uploads into a real LocalStore: round trips, limits, bad files, and use at submit."""

from __future__ import annotations

import hashlib
import io
import json


from api.schemas import UploadOut
from tests.api.conftest import MINIMAL, counts

TEXT = "def add(a, b):\n    return a + b\n\n# ünïcode is fine\n" * 50


def _upload(client, data: bytes = TEXT.encode(), name: str = "calib.txt"):
    return client.post("/v1/uploads", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def test_multipart_round_trip(lite, store):
    client = lite.test_client()
    resp = _upload(client)
    assert resp.status_code == 201
    meta = UploadOut.model_validate(resp.get_json()).model_dump(mode="json")
    data = TEXT.encode()
    assert (meta["filename"], meta["size_bytes"], meta["sha256"]) == ("calib.txt", len(data), hashlib.sha256(data).hexdigest())
    assert resp.headers["Location"] == f"/v1/uploads/{meta['id']}"
    assert store.get_bytes(f"uploads/{meta['id']}/calib.txt") == data
    assert json.loads(store.get_bytes(f"uploads/{meta['id']}/meta.json")) == resp.get_json()
    got = client.get(f"/v1/uploads/{meta['id']}")
    assert got.status_code == 200 and got.get_json() == resp.get_json()


def test_raw_text_body_round_trip(lite, store):
    client = lite.test_client()
    resp = client.post("/v1/uploads?filename=lines.txt", data=TEXT.encode(), content_type="text/plain")
    assert resp.status_code == 201
    meta = resp.get_json()
    assert meta["filename"] == "lines.txt"
    assert store.get_bytes(f"uploads/{meta['id']}/lines.txt") == TEXT.encode()


def test_upload_is_usable_as_calibration(client, submit):
    upload_id = _upload(client).get_json()["id"]
    job = submit(calibration={"upload_id": upload_id, "num_samples": 8})
    assert job["spec"]["calibration"]["upload_id"] == upload_id


def test_unknown_upload_id_at_submit_is_422(client, db, dispatcher):
    before = counts(db)
    for body, field in (
        ({**MINIMAL, "calibration": {"upload_id": "upl_01jzzzzzzzzzzzzzzzzzzzzzzz"}}, "calibration.upload_id"),
        ({**MINIMAL, "calibration": {"upload_id": "../../etc"}}, "calibration.upload_id"),
        ({"model": {"source": "upload", "upload_id": "upl_01jzzzzzzzzzzzzzzzzzzzzzzz"}, "method": "rtn"}, "model.upload_id"),
    ):
        resp = client.post("/v1/jobs", json=body)
        assert resp.status_code == 422
        assert list(resp.get_json()["details"]["fields"]) == [field]
    assert counts(db) == before and dispatcher.jobs == []


def test_too_large_is_413_and_stores_nothing(lite, store):
    lite.config["MAX_UPLOAD_BYTES"] = 1000
    client = lite.test_client()
    for resp in (
        _upload(client, b"x" * 2000),
        client.post("/v1/uploads?filename=big.txt", data=b"x" * 2000, content_type="text/plain"),
        client.post("/v1/uploads?filename=big.txt", data=b"x" * 200_000, content_type="text/plain"),
    ):
        assert resp.status_code == 413
        assert resp.get_json()["error"] == "payload_too_large"
        assert resp.get_json()["details"] == {"limit_bytes": 1000}
    assert store.list("uploads") == []
    assert _upload(client, b"y" * 1000).status_code == 201


BAD_FILES = [
    (b"\xff\xfe\x00binary", "calib.txt", "file", "must be UTF-8 text"),
    (b"", "calib.txt", "file", "is empty"),
    (b"text", "meta.json", "file", "meta.json is reserved; rename the file"),
    (b"text", "../..", "file", "must contain letters or digits"),
]


def test_bad_files_are_422(lite, store):
    client = lite.test_client()
    for data, name, field, why in BAD_FILES:
        resp = _upload(client, data, name)
        assert resp.status_code == 422, name
        assert resp.get_json()["details"]["fields"] == {field: why}
    assert store.list("uploads") == []


def test_missing_parts_are_422(lite, store):
    client = lite.test_client()
    resp = client.post("/v1/uploads", data={"other": (io.BytesIO(b"x"), "a.txt")}, content_type="multipart/form-data")
    assert resp.status_code == 422 and resp.get_json()["details"]["fields"] == {"file": "field required"}
    resp = client.post("/v1/uploads", data=b"some text", content_type="text/plain")
    assert resp.status_code == 422 and resp.get_json()["details"]["fields"] == {"filename": "field required"}
    assert store.list("uploads") == []


def test_unsafe_filename_is_sanitized(lite, store, tmp_path):
    client = lite.test_client()
    resp = _upload(client, b"hello", "../../escape.txt")
    assert resp.status_code == 201
    upload_id = resp.get_json()["id"]
    assert resp.get_json()["filename"] == "escape.txt"
    assert store.list("uploads") == [f"uploads/{upload_id}/escape.txt", f"uploads/{upload_id}/meta.json"]
    assert not (tmp_path / "escape.txt").exists()


def test_unknown_upload_is_404(lite):
    client = lite.test_client()
    for upload_id in ("upl_01jzzzzzzzzzzzzzzzzzzzzzzz", "upl_bad", ".."):
        resp = client.get(f"/v1/uploads/{upload_id}")
        assert resp.status_code == 404 and resp.get_json()["error"] == "not_found"
