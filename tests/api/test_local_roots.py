"""Submit refuses a `local` model path outside QUANTFARM_LOCAL_ROOTS (symlinks resolved), and every one without roots."""

from __future__ import annotations

import pytest

from tests.api.conftest import MINIMAL, counts, make_app


def post(app, path: str):
    return app.test_client().post("/v1/jobs", json={**MINIMAL, "model": {"source": "local", "path": path}})


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    (root / "llama").mkdir(parents=True)
    (root / "etc-link").symlink_to("/etc")  # under the root by name, /etc once resolved
    return root


def test_only_paths_under_the_roots_are_accepted(db, store, dispatcher, tmp_path, models):
    app = make_app(db, store, dispatcher, tmp_path, local_roots=[models])
    before = counts(db)
    for path in ("/etc", str(models / "etc-link"), str(models / ".." / "elsewhere"), str(tmp_path)):
        resp = post(app, path)
        assert resp.status_code == 422, path
        assert resp.get_json()["details"]["fields"] == {"model.path": f"must be a folder under one of the local roots ({models})"}
    assert counts(db) == before and dispatcher.jobs == []
    ok = post(app, str(models / "llama"))
    assert ok.status_code == 201 and ok.get_json()["model"] == f"local:{models / 'llama'}"


def test_without_roots_local_sources_are_off(db, store, dispatcher, tmp_path, models):
    app = make_app(db, store, dispatcher, tmp_path, local_roots=[])
    resp = post(app, str(models / "llama"))
    assert resp.status_code == 422
    assert "QUANTFARM_LOCAL_ROOTS" in resp.get_json()["details"]["fields"]["model.path"]
    assert dispatcher.jobs == []
