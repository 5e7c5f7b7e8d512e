"""LocalStore keys resolve inside its root: no '..', empty segments, leading '/', nor a link out of the root."""

from __future__ import annotations

import pytest

from quantfarm.errors import BadRequest
from storage.artifacts import LocalStore


@pytest.fixture
def store(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not the store's")
    s = LocalStore(tmp_path / "root")
    (s.root / "jobs").mkdir()
    (s.root / "jobs" / "escape").symlink_to(outside)  # planted by anything that can write the store's folder
    return s


@pytest.mark.parametrize("key", ["jobs/escape/secret", "../outside/secret", "/etc/passwd", "jobs//x", "jobs/./x", "a\\b", ""])
def test_keys_that_leave_the_root_are_refused(store, key, tmp_path):
    for call in (lambda: store.get_bytes(key), lambda: store.open(key), lambda: store.put_bytes(key, b"x"),
                 lambda: store.exists(key), lambda: store.get_file(key, tmp_path / "copy")):
        with pytest.raises(BadRequest) as err:
            call()
        assert err.value.code == "invalid_path"
    assert (tmp_path / "outside" / "secret").read_text() == "not the store's"
    assert not (tmp_path / "copy").exists()


def test_listing_a_prefix_that_links_out_is_refused(store):
    with pytest.raises(BadRequest):
        store.list("jobs/escape")
    store.put_bytes("jobs/j1/config.json", b"{}")
    assert store.list("jobs/j1/") == ["jobs/j1/config.json"] and store.get_bytes("jobs/j1/config.json") == b"{}"
