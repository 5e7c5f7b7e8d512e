"""Hub calibration sets: never the worker's own Hub identity, never a path on the worker's disk.

The Hub is unreachable here: ``datasets`` talks to the stand-in of tests/support/hubserver.py,
which records the Authorization header of every request (it has no dataset endpoints, so the
load itself fails after the first requests, which is all these tests need). ``datasets`` reads
HF_ENDPOINT at import, so each load runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from quantfarm.errors import CalibrationError
from tests.support.hubserver import HubServer
from workers.engine.calibration import hub_texts

AMBIENT = "hf_FARMS_OWN_token_must_not_leak"
JOBS = "hf_the_jobs_own_token"

LOAD = """
import json, sys
from quantfarm.errors import CalibrationError
from workers.engine.calibration import hub_texts
try:
    hub_texts("hub:org/calib::train", 1000, *sys.argv[1:])  # no token argument at all for a tokenless job
except CalibrationError as exc:
    print(json.dumps(exc.message))
"""


def load_in_worker(hub: HubServer, tmp_path, token: str) -> str:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": AMBIENT, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", LOAD, *([token] if token else [])], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_a_tokenless_hub_dataset_sends_no_authorization(tmp_path):
    with HubServer() as hub:
        message = load_in_worker(hub, tmp_path, "")
        assert "Could not load Hub dataset 'org/calib'" in message
        assert hub.requests and {tok for _, _, tok in hub.requests} == {None}, hub.requests
        n = len(hub.requests)
        load_in_worker(hub, tmp_path, JOBS)
        assert {tok for _, _, tok in hub.requests[n:]} == {JOBS}  # a job's own token is sent, and only it


@pytest.mark.parametrize("name", ["/etc", "../x", "org/../x", "here"])
def test_a_hub_dataset_that_names_a_path_is_never_read_from_disk(name, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "data.txt").write_text("a worker's file")
    monkeypatch.chdir(tmp_path)  # datasets would read ./here before asking the Hub
    with pytest.raises(CalibrationError) as err:
        hub_texts(f"hub:{name}", 1000)
    assert err.value.message == (f"Hub dataset {name!r} is not a Hub dataset id, or names a path on this worker; "
                                 "calibration sets come from the Hub, never from a worker's disk.")
