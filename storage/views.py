"""The job and artifact objects of the HTTP API (and of webhook payloads)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from quantfarm.spec import mask_url
from storage.models import Artifact, Job, JobEvent, WebhookDelivery


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z; a naive value is UTC (as the database stores it: storage.job_reads reads it raw)."""
    if dt is None:
        return None
    return dt.isoformat() + "Z" if dt.tzinfo is None else dt.isoformat().replace("+00:00", "Z")


def artifact_view(a: Artifact) -> dict[str, Any]:
    return {
        "id": a.id,
        "job_id": a.job_id,
        "kind": a.kind,
        "format": a.format,
        "files": a.file_count,
        "size_bytes": a.size_bytes,
        "sha256": a.sha256,
        "location": a.location,
        "hub_url": a.hub_url,
        "hub_commit": a.hub_commit,
        "source_revision": a.source_revision,
        "source_files": a.source_files,
        "created_at": iso(a.created_at),
    }


def progress_view(job: Job) -> dict[str, Any] | None:
    if job.layers_total is None:
        return None
    done = job.layers_done or 0
    return {
        "layers_done": done,
        "layers_total": job.layers_total,
        "fraction": round(done / job.layers_total, 4) if job.layers_total else 0.0,
        "eta_seconds": job.eta_seconds,
    }


def job_view(job: Job, artifacts: list[Artifact] | None = None) -> dict[str, Any]:
    """The job object of API.md (secrets were never stored in ``spec``)."""
    arts = job.artifacts if artifacts is None else artifacts
    return {
        "id": job.id,
        "team_id": job.team_id,
        "created_by": job.created_by,
        "status": job.status,
        "stage": job.stage,
        "method": job.method,
        "model": job.model_ref,
        "progress": progress_view(job),
        "attempt": job.attempt,
        "memory_estimate_bytes": job.memory_estimate,
        "reused_from": job.reused_from,  # the team's own job id, or "another_team" (another team's ids never show)
        "cancel_requested": job.cancel_requested,
        "spec": job.spec,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "metrics": job.metrics or {},
        "artifacts": [artifact_view(a) for a in arts],
        "labels": (job.spec or {}).get("labels", {}),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "updated_at": iso(job.updated_at),
    }


def event_view(e: JobEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": iso(e.at),
        "kind": e.kind,
        "from_status": e.from_status,
        "to_status": e.to_status,
        "stage": e.stage,
        "message": e.message,
        "data": e.data or {},
    }


def delivery_view(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job_id,
        "url": mask_url(d.url),  # rows from before URLs were secrets hold the full URL
        "event_type": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "next_attempt_at": iso(d.next_attempt_at),
        "created_at": iso(d.created_at),
        "delivered_at": iso(d.delivered_at),
        "log": [
            {
                "at": iso(a.at),
                "status_code": a.status_code,
                "latency_ms": a.latency_ms,
                "error": a.error,
                "next_attempt_at": iso(a.next_attempt_at),
            }
            for a in d.attempt_log
        ],
    }
