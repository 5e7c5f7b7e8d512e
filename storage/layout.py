"""The artifact store's key layout, for the API and the workers alike (one place spells keys).

jobs/{job_id}/artifacts/{claim}/...   a job's quantized files, written under the claim that made them
jobs/{job_id}/artifacts/{claim}-{fmt}/ each further format the job writes (compressed-tensors, gguf, ...)
jobs/{job_id}/artifact/...            the same, for artifacts made before claims were counted
jobs/{job_id}/checkpoints/...         per-layer checkpoints (resume on any worker)
uploads/{upload_id}/...               calibration and model uploads, with a meta.json
"""

from __future__ import annotations

import re

UPLOAD_META = "meta.json"
_JOB_KEY = re.compile(r"^jobs/(?P<job>[^/]+)/(?P<kind>artifacts|artifact|checkpoints)(?:/(?P<claim>\d+)(?:-[a-z0-9-]+)?)?/")


def artifact_prefix(job_id: str, claim: int, fmt: str | None = None) -> str:
    """Where the worker holding claim ``claim`` writes the job's artifact (a zombie's claim writes elsewhere).

    A job's first format is at ``artifacts/<claim>``, each further one at ``artifacts/<claim>-<format>``.
    """
    return f"jobs/{job_id}/artifacts/{int(claim)}" + (f"-{fmt}" if fmt else "")


def legacy_artifact_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/artifact"


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def upload_prefix(upload_id: str) -> str:
    return f"uploads/{upload_id}"


def upload_meta_key(upload_id: str) -> str:
    return f"{upload_prefix(upload_id)}/{UPLOAD_META}"


def stored_prefix(artifact) -> str:
    """The key prefix holding an artifact row's files."""
    return artifact.store_prefix or legacy_artifact_prefix(artifact.job_id)


def parse_job_key(key: str) -> tuple[str, str, int | None] | None:
    """(job id, kind, claim) of a key under jobs/, or None for any other key."""
    m = _JOB_KEY.match(key)
    if m is None:
        return None
    return m["job"], m["kind"], int(m["claim"]) if m["claim"] else None
