"""A job asking for several formats: one calibration, one artifact per format, each stored under its own prefix.

Runs the real runner on PostgreSQL and SQLite with a local store, as test_runner does.
"""

from __future__ import annotations

import hashlib
import json

from quantfarm.settings import Settings
from storage.artifacts import LocalStore
from tests.workers.test_runner import load, submit
from storage.layout import checkpoint_prefix, stored_prefix
from workers.runner import JobRunner


def test_each_format_is_its_own_artifact(db, tmp_path, tiny_llama):
    settings, store = Settings(home=tmp_path / "home", lease_seconds=30), LocalStore(tmp_path / "store")
    job_id = submit(db, {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn", "options": {"group_size": 32},
                         "formats": ["compressed-tensors", "gptq"]})
    assert JobRunner(settings, db, store).run(job_id) == "succeeded"
    job, events, arts = load(db, job_id)
    assert [e.stage for e in events if e.kind == "stage"] == ["fetching", "calibrating", "exporting", "evaluating", "uploading"]  # evaluation is on by default
    assert [e.data["layers_done"] for e in events if e.kind == "progress"] == [1, 2]  # one layer walk for both
    by_format = {a.format: a for a in arts}
    assert {(a.kind, a.format) for a in arts} == {("model", "compressed-tensors"), ("gptq", "gptq")}
    assert stored_prefix(by_format["gptq"]) == stored_prefix(by_format["compressed-tensors"]) + "-gptq"
    for fmt, method in (("compressed-tensors", "compressed-tensors"), ("gptq", "gptq")):
        art = by_format[fmt]
        prefix = stored_prefix(art)
        assert art.location == store.uri(prefix) and art.file_count == len(art.files) > 3
        for f in art.files:
            blob = store.get_bytes(f"{prefix}/{f['path']}")
            assert len(blob) == f["size"] and hashlib.sha256(blob).hexdigest() == f["sha256"]
        config = json.loads(store.get_bytes(f"{prefix}/config.json"))
        assert config["quantization_config"]["quant_method"] == method
    assert by_format["gptq"].sha256 != by_format["compressed-tensors"].sha256
    assert set(job.metrics["formats"]) == {"compressed-tensors", "gptq"}
    assert job.metrics["size_bytes_after"] == job.metrics["formats"]["compressed-tensors"]["size_bytes"]
    assert store.list(checkpoint_prefix(job_id)) == []
