"""The submit form's Hub paths, as the browser posts them: a Hub model, a Hub calibration set, a Hub destination.

The browser tests (tests/browser) drive the local-path and validation paths in
Chromium; these post the same field names straight to the page's handler.
"""

from __future__ import annotations

from storage import jobs as job_store

HUB_FORM = {
    "model.source": "hub", "model.repo_id": "org/tiny-llama", "model.revision": "v2", "model.token": "hf_FORMsecret_0123456789abcdef",
    "method": "gptq", "options.gptq.bits": "3", "options.gptq.group_size": "64",
    "calibration.kind": "hub", "calibration.hub": "wikitext:wikitext-2-raw-v1:train",
    "calibration.num_samples": "32", "calibration.seq_len": "256",
    "destination.store": "on", "destination.hub.repo_id": "team/tiny-llama-gptq", "destination.hub.private": "on",
    "destination.hub.branch": "w3", "destination.hub.token": "hf_DESTsecret_0123456789abcdef",
    "webhooks.0.url": "https://ci.example/hooks/qf",
}


def test_the_hub_paths_of_the_form_make_the_job_they_say(client, db):
    resp = client.post("/", data=HUB_FORM)
    assert resp.status_code == 303, resp.data[-2000:]
    job_id = resp.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
    spec = client.get(f"/v1/jobs/{job_id}").get_json()["spec"]
    assert spec["model"] == {"source": "hub", "repo_id": "org/tiny-llama", "revision": "v2"}
    assert spec["calibration"]["dataset"] == "hub:wikitext:wikitext-2-raw-v1:train"
    assert (spec["calibration"]["num_samples"], spec["calibration"]["seq_len"]) == (32, 256)
    assert spec["options"]["bits"] == 3 and spec["options"]["group_size"] == 64
    hub = spec["destination"]["hub"]
    assert (hub["repo_id"], hub["private"], hub["branch"]) == ("team/tiny-llama-gptq", True, "w3") and "token" not in hub
    assert spec["destination"]["store"] is True
    assert spec["webhooks"] == [{"url": "https://ci.example/***"}]  # webhook URLs are secrets
    with db.session() as s:
        secrets = job_store.get_job(s, job_id).secrets
    assert secrets["model.token"] == HUB_FORM["model.token"]
    assert secrets["destination.hub.token"] == HUB_FORM["destination.hub.token"]
    page = client.get(f"/jobs/{job_id}").data.decode()
    assert "hf_FORMsecret" not in page and "hf_DESTsecret" not in page
    assert "org/tiny-llama" in page


def test_a_bad_hub_repo_id_is_shown_by_its_field_and_keeps_the_rest(client, db):
    before = client.get("/v1/jobs").get_json()["items"]
    resp = client.post("/", data={**HUB_FORM, "destination.hub.repo_id": "not a repo"})
    assert resp.status_code == 422
    assert client.get("/v1/jobs").get_json()["items"] == before  # nothing was created
    page = resp.data.decode()
    assert 'id="err-destination-hub-repo_id"' in page and 'aria-invalid="true"' in page  # the error sits by its field
    assert 'value="wikitext:wikitext-2-raw-v1:train"' in page  # what the user typed is kept
    assert "hf_FORMsecret" not in page and "hf_DESTsecret" not in page  # secrets are never echoed


def test_the_reuse_box_is_ticked_by_default_and_maps_to_the_spec_and_openapi(client, db):
    page = client.get("/").data.decode()
    assert 'name="reuse"' in page and "Reuse an identical result" in page
    box = page[page.index('name="reuse"') - 200: page.index('name="reuse"') + 200]
    assert "checked" in box
    for data, want in (({**HUB_FORM, "reuse": "on"}, True), (HUB_FORM, False)):
        resp = client.post("/", data=data)
        assert resp.status_code == 303, resp.data[-2000:]
        job_id = resp.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
        assert client.get(f"/v1/jobs/{job_id}").get_json()["spec"]["reuse"] is want
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert schemas["GPTQJob"]["properties"]["reuse"]["default"] is True
    assert "reused_from" in schemas["JobOut"]["properties"]
