"""The task gate's generations for the methods whose artifact transformers loads whole (bitsandbytes, GGUF, LoftQ).

The layer-wise methods' path runs in tests/workers/test_task_gate.py through a real job.
"""

from __future__ import annotations

import json

import pytest

from quantfarm import spec
from quantfarm.quality import Gate
from storage.artifacts import LocalStore
from tests.support.models import greedy_tasks
from tests.workers.engine_methods.helpers import CALIB, CPU
from workers.engine.pipeline import QuantizeRequest
from workers.engine.run import quantize

MAX_NEW = 6


@pytest.mark.parametrize("method,options", [("bnb-4bit", {}), ("gguf", {}), ("loftq", {"rank": 4, "iterations": 1})])
def test_whole_model_methods_score_the_task_set_before_and_after(tiny_source, tmp_path, method, options):
    source = tiny_source("llama")
    tasks = greedy_tasks(source, MAX_NEW)
    assert tasks
    text = "\n".join(json.dumps(t) for t in tasks)
    req = QuantizeRequest(
        source_dir=source, method=method, options=spec.method_options()[method](**options), calibration=CALIB,
        base_model="org/tiny", read_upload={"upl_tasks": text}.__getitem__,
        gate=Gate(task_set_upload_id="upl_tasks", min_exact_match=0, max_new_tokens=MAX_NEW),
    )
    stages = []
    res = quantize(req, LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=CPU, on_stage=stages.append)
    m = res.metrics
    assert m["task_count"] == len(tasks) and m["task_exact_match_before"] == 1.0
    assert 0 <= m["task_exact_match_after"] <= 1 and "perplexity_before" not in m
    assert stages[-1] == "evaluating"
    assert f"| task_exact_match_after | {m['task_exact_match_after']:.4f} |" in (tmp_path / "out" / "README.md").read_text()
