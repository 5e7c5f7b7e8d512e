"""Pages elsewhere cannot make a visitor's browser change the farm; other clients are not affected."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import MINIMAL, counts

EVIL = "https://evil.example"


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": EVIL}, {"Origin": "null"}])
def test_a_cross_site_submit_is_403_and_stores_nothing(client, db, dispatcher, headers):
    before = counts(db)
    # A form can send text/plain that parses as JSON: the body alone does not tell.
    resp = client.post("/v1/jobs", data=json.dumps(MINIMAL), content_type="text/plain", headers=headers)
    assert resp.status_code == 403
    body = resp.get_json()
    assert body["error"] == "forbidden" and "another" in body["message"]
    assert counts(db) == before and dispatcher.jobs == []
    page = client.post("/", data={"method": "rtn", "model.source": "local", "model.path": "/m"}, headers=headers)
    assert page.status_code == 403 and counts(db) == before


def test_a_cross_site_cancel_leaves_the_job_alone(client, submit):
    job = submit()
    for path in (f"/v1/jobs/{job['id']}/cancel", f"/jobs/{job['id']}/cancel"):
        resp = client.post(path, headers={"Sec-Fetch-Site": "cross-site", "Origin": EVIL})
        assert resp.status_code == 403
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "queued"


@pytest.mark.parametrize("headers", [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                                     {"Origin": "http://localhost"}, {"Origin": "https://localhost"}])
def test_same_origin_pages_and_plain_clients_go_through(client, headers):
    # The test client's host is localhost; a scheme change (a TLS proxy in front) still counts as the same host.
    resp = client.post("/v1/jobs", json=MINIMAL, headers=headers)
    assert resp.status_code == 201, resp.get_json()


def test_reads_are_never_refused(client, submit):
    job = submit()
    assert client.get(f"/v1/jobs/{job['id']}", headers={"Sec-Fetch-Site": "cross-site", "Origin": EVIL}).status_code == 200
