"""S3Store against a real ``moto_server`` over HTTP, with faults injected by a proxy in front of it."""

from __future__ import annotations

import hashlib
import random

import pytest
import requests

from quantfarm.errors import JobError, StorageUnavailable
from quantfarm.store import sha256_file
from storage.artifacts import make_store
from storage.s3 import S3Store
from tests.support.s3server import s3_settings_for

MiB = 1024 * 1024


def count_requests(store: S3Store) -> list[str]:
    """Record every HTTP attempt the client makes (retries included)."""
    seen: list[str] = []
    store.client.meta.events.register("before-send.s3.*", lambda request, **kw: seen.append(request.method))
    return seen


def write_random(path, size: int, seed: int = 0):
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def test_round_trips_bytes_files_and_streams(s3_settings, tmp_path):
    store = make_store(s3_settings)
    assert isinstance(store, S3Store)
    store.put_bytes("a/b.txt", b"hello")
    src = write_random(tmp_path / "src.bin", 300_000)
    store.put_file("a/c.bin", src)

    assert store.get_bytes("a/b.txt") == b"hello"
    store.get_file("a/c.bin", tmp_path / "out" / "c.bin")
    assert sha256_file(tmp_path / "out" / "c.bin") == sha256_file(src)
    body = store.open("a/c.bin")
    h = hashlib.sha256()
    for chunk in iter(lambda: body.read(64 * 1024), b""):
        h.update(chunk)
    body.close()
    assert h.hexdigest() == sha256_file(src)
    assert (store.exists("a/b.txt"), store.exists("a/zzz"), store.size("a/c.bin")) == (True, False, 300_000)
    assert store.uri("a/c.bin") == f"s3://{s3_settings.s3_bucket}/a/c.bin"
    store.delete("a/b.txt")
    assert store.list("a") == ["a/c.bin"]
    # The bucket did not exist before the first write; the farm's store created it.
    assert s3_settings.s3_bucket in [b["Name"] for b in store.client.list_buckets()["Buckets"]]


def test_large_file_goes_up_in_parts_and_comes_back_identical(s3_settings, tmp_path):
    store = S3Store.from_settings(s3_settings)
    src = write_random(tmp_path / "big.safetensors", 12 * MiB, seed=1)
    sent = count_requests(store)
    store.put_file("jobs/j1/model.safetensors", src)
    # Three 5 MiB parts: create + 3 x upload-part + complete (plus the bucket check).
    assert sent.count("PUT") >= 3 and sent.count("POST") == 2
    head = store.client.head_object(Bucket=store.bucket, Key="jobs/j1/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part multipart upload
    store.get_file("jobs/j1/model.safetensors", tmp_path / "back.safetensors")
    assert sha256_file(tmp_path / "back.safetensors") == sha256_file(src)
    assert store.size("jobs/j1/model.safetensors") == 12 * MiB


def test_list_paginates_and_keeps_prefix_boundaries(s3_settings):
    store = S3Store.from_settings(s3_settings, prefix="farm")
    store.page_size = 2
    names = [f"ckpt/job1/layer-{i:02d}.safetensors" for i in range(7)]
    for n in names:
        store.put_bytes(n, n.encode())
    store.put_bytes("ckpt/job10/other", b"x")
    sent = count_requests(store)
    assert store.list("ckpt/job1") == names  # not ckpt/job10/...
    assert sent.count("GET") == 4  # 7 keys at 2 per page
    assert store.list("ckpt/job1/layer-03.safetensors") == ["ckpt/job1/layer-03.safetensors"]
    assert store.list("nothing/here") == []
    assert len(store.list("")) == 8
    raw = store.client.list_objects_v2(Bucket=store.bucket)["Contents"]
    assert all(o["Key"].startswith("farm/ckpt/") for o in raw)
    assert store.uri("ckpt/job1") == f"s3://{store.bucket}/farm/ckpt/job1"
    store.delete_prefix("ckpt/job1")
    assert store.list("") == ["ckpt/job10/other"]


def test_upload_dir_and_download_prefix_keep_hashes(s3_settings, tmp_path):
    store = S3Store.from_settings(s3_settings)
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    write_random(src / "model.safetensors", 200_000, seed=2)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "tok.json").write_text("{}")
    entries = store.upload_dir("jobs/j2/artifact", src)
    assert {e.path: e.sha256 for e in entries} == {p: sha256_file(src / p) for p in ("config.json", "model.safetensors", "sub/tok.json")}
    store.download_prefix("jobs/j2/artifact", tmp_path / "back")
    for e in entries:
        assert sha256_file(tmp_path / "back" / e.path) == e.sha256


def test_presigned_url_works_with_plain_requests(s3_settings):
    store = S3Store.from_settings(s3_settings)
    store.put_bytes("files/readme.md", b"# card\n")
    url = store.presigned_url("files/readme.md", expires=300)
    assert url.startswith(s3_settings.s3_endpoint_url) and "X-Amz-Signature=" in url
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200 and resp.content == b"# card\n"
    assert requests.get(store.presigned_url("files/missing"), timeout=10).status_code == 404


def test_missing_key_is_a_key_error_and_leaves_nothing_behind(s3_settings, tmp_path):
    store = S3Store.from_settings(s3_settings)
    store.put_bytes("present", b"1")
    for call in (lambda: store.get_bytes("absent"), lambda: store.open("absent"), lambda: store.size("absent"),
                 lambda: store.get_file("absent", tmp_path / "d" / "absent")):
        with pytest.raises(KeyError) as err:
            call()
        assert err.value.args == ("absent",)
    assert list((tmp_path / "d").iterdir()) == []  # no partial download
    store.delete("absent")  # deleting a missing key is not an error
    assert store.get_bytes("present") == b"1"


def test_unknown_bucket_is_a_clear_error(s3_settings):
    store = S3Store.from_settings(s3_settings, bucket="no-such-bucket-here")
    with pytest.raises(JobError) as err:
        store.get_bytes("x")
    assert err.value.code == "storage_error" and "'no-such-bucket-here' does not exist" in err.value.message


# --- faults ---------------------------------------------------------------------------------------


def test_injected_5xx_are_retried_and_succeed(faulty_s3_settings, s3_proxy, tmp_path):
    store = S3Store.from_settings(faulty_s3_settings)
    store.put_bytes("k", b"v")
    s3_proxy.fail_next(2, 503)
    sent = count_requests(store)
    assert store.get_bytes("k") == b"v"
    assert (s3_proxy.faulted, len(sent)) == (2, 3)
    # A multipart upload survives failures too, and the bytes are intact.
    src = write_random(tmp_path / "big.bin", 11 * MiB, seed=3)
    s3_proxy.fail_next(2, 500)
    store.put_file("big.bin", src)
    store.get_file("big.bin", tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == sha256_file(src) and s3_proxy.faulted == 4


def test_every_retry_is_logged(faulty_s3_settings, s3_proxy, caplog):
    import logging

    store = S3Store.from_settings(faulty_s3_settings)
    store.put_bytes("k", b"v")
    s3_proxy.fail_next(2, 503)
    with caplog.at_level(logging.WARNING, logger="storage.s3"):
        assert store.get_bytes("k") == b"v"
    lines = [r.getMessage() for r in caplog.records if r.name == "storage.s3"]
    assert lines == [f"S3 GetObject at {s3_proxy.url} failed (HTTP 503), attempt {n} of 3; retrying" for n in (1, 2)]
    s3_proxy.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="storage.s3"), pytest.raises(StorageUnavailable):
        store.get_bytes("k")
    lines = [r.getMessage() for r in caplog.records if r.name == "storage.s3"]
    assert lines[-1] == f"S3 GetObject at {s3_proxy.url} failed (EndpointConnectionError), attempt 3 of 3; giving up" and len(lines) == 3


def test_stalled_response_times_out_and_is_retried(faulty_s3_settings, s3_proxy):
    store = S3Store.from_settings(faulty_s3_settings)
    store.put_bytes("k", b"v")
    s3_proxy.stall_next(1, faulty_s3_settings.s3_read_timeout + 1.0)
    sent = count_requests(store)
    assert store.get_bytes("k") == b"v"
    assert (s3_proxy.faulted, len(sent)) == (1, 2)


def test_persistent_5xx_becomes_storage_unavailable(faulty_s3_settings, s3_proxy):
    store = S3Store.from_settings(faulty_s3_settings)
    store.put_bytes("k", b"v")
    s3_proxy.fail_next(10, 500)
    sent = count_requests(store)
    with pytest.raises(StorageUnavailable) as err:
        store.get_bytes("k")
    assert len(sent) == 3 and s3_proxy.faulted == 3
    assert err.value.code == "storage_unavailable" and err.value.retryable
    assert f"Object storage at {s3_proxy.url} is unavailable (HTTP 500" in err.value.message


def test_endpoint_down_fails_after_retries_and_data_survives(faulty_s3_settings, s3_proxy):
    store = S3Store.from_settings(faulty_s3_settings)
    store.put_bytes("ckpt/layer-0", b"tensor bytes")
    s3_proxy.stop()
    sent = count_requests(store)
    with pytest.raises(StorageUnavailable) as err:
        store.put_bytes("ckpt/layer-1", b"more")
    assert len(sent) == faulty_s3_settings.s3_max_attempts == 3
    assert err.value.message == (
        f"Object storage at {s3_proxy.url} is unavailable (EndpointConnectionError during put_object) after 3 attempts; "
        "retry the job once the endpoint is back."
    )
    assert err.value.details == {"endpoint": s3_proxy.url, "bucket": faulty_s3_settings.s3_bucket}
    with pytest.raises(StorageUnavailable):
        store.list("ckpt")
    s3_proxy.start()  # the endpoint is back: what was written before is intact
    assert store.list("ckpt") == ["ckpt/layer-0"] and store.get_bytes("ckpt/layer-0") == b"tensor bytes"


# --- start-up: the farm's bucket exists before any job reads from it -------------------------------


def _bucket_exists(store: S3Store) -> bool:
    return store.bucket in {b["Name"] for b in store.client.list_buckets()["Buckets"]}


def test_a_read_on_an_empty_endpoint_makes_the_farm_bucket_first(s3_settings):
    """A job's first store call is a read (its checkpoint manifest): it must see 'no such key', not 'no bucket'."""
    store = S3Store.from_settings(s3_settings)
    assert not _bucket_exists(store)
    with pytest.raises(KeyError):
        store.get_bytes("jobs/job_1/checkpoints/manifest.json")
    assert _bucket_exists(store)
    assert store.list("jobs/job_1/checkpoints") == []


def test_make_store_creates_the_bucket_at_start_up(s3_settings):
    store = make_store(s3_settings)
    assert _bucket_exists(store)
    sent = count_requests(store)
    assert store.exists("anything") is False and sent == ["HEAD"]  # no second bucket check


def test_start_up_waits_for_a_late_endpoint_then_says_why(tmp_path, s3_proxy):
    from storage.artifacts import StoreNotReady, prepare_store

    settings = s3_settings_for(tmp_path, s3_proxy.url, s3_max_attempts=1, s3_connect_timeout=0.5)
    store = S3Store.from_settings(settings)
    s3_proxy.stop()
    with pytest.raises(StoreNotReady) as err:
        prepare_store(store, 0.6)
    assert str(err.value).startswith("The artifact store is not reachable after 0.6s: Object storage at " + s3_proxy.url)
    slept: list[float] = []
    s3_proxy.start()
    prepare_store(store, 5.0, sleep=slept.append)
    assert slept == [] and _bucket_exists(store)


def test_start_up_refusal_fails_at_once(tmp_path, s3_proxy):
    from storage.artifacts import StoreNotReady, prepare_store

    settings = s3_settings_for(tmp_path, s3_proxy.url, s3_max_attempts=1)
    store = S3Store.from_settings(settings)
    s3_proxy.fail_next(1, 403)
    slept: list[float] = []
    with pytest.raises(StoreNotReady) as err:
        prepare_store(store, 30.0, sleep=slept.append)
    assert slept == [] and s3_proxy.faulted == 1
    assert f"Access to bucket '{settings.s3_bucket}'" in str(err.value) and "denied" in str(err.value)
