"""``hub:`` calibration datasets must be Hub dataset ids: a path is a 422 at submit, never a worker folder."""

from __future__ import annotations

import pytest

from tests.api.conftest import MINIMAL, counts

BAD = ["hub:/some/local/dir", "hub:../x", "hub:org/../x", "hub:./x", "hub:org/name/extra", "hub:org/na me",
       "hub:org/name:cfg/../x", "hub:org/name:cfg:train:more", "hub:"]
GOOD = ["hub:wikitext:wikitext-2-raw-v1:train", "hub:org/name", "hub:org/name::validation", "hub:allenai/c4:en:train"]


@pytest.mark.parametrize("dataset", BAD)
def test_a_hub_dataset_that_is_not_a_repo_id_is_a_422(client, db, dispatcher, dataset):
    before = counts(db)
    resp = client.post("/v1/jobs", json={**MINIMAL, "calibration": {"dataset": dataset}})
    assert resp.status_code == 422, dataset
    body = resp.get_json()
    assert body["error"] == "validation_error" and list(body["details"]["fields"]) == ["calibration.dataset"]
    assert counts(db) == before and dispatcher.jobs == []


@pytest.mark.parametrize("dataset", GOOD)
def test_hub_dataset_ids_are_accepted(client, dataset):
    resp = client.post("/v1/jobs", json={**MINIMAL, "calibration": {"dataset": dataset}})
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["spec"]["calibration"]["dataset"] == dataset
