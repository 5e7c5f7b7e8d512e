"""The farm's workers: registration, presence, admission by memory, and the farm view.

Each worker process registers a row (device, memory, methods, formats, engine version)
and beats while it lives, with the job it runs. A job whose memory estimate exceeds
every live worker is refused (``too_large``); with no worker registered, jobs queue.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from quantfarm.errors import TooLarge
from storage.jobs import JobStatus
from storage.models import Job, Team, Worker, utcnow

GIB = 1024**3


def register(s: Session, worker_id: str, *, device: str, memory_bytes: int, methods: list[str], formats: list[str],
             engine_version: str, hostname: str) -> Worker:
    """Insert or refresh this worker's row."""
    now = utcnow()
    w = s.get(Worker, worker_id) or Worker(id=worker_id, started_at=now)
    w.device, w.memory_bytes, w.methods, w.formats = device, int(memory_bytes), sorted(methods), sorted(formats)
    w.engine_version, w.hostname, w.last_seen_at = engine_version, hostname, now
    s.add(w)
    s.flush()
    return w


def beat(s: Session, worker_id: str, current_job: str | None) -> bool:
    """Record that the worker lives and what it runs; False when its row is gone (register again)."""
    res = s.execute(update(Worker).where(Worker.id == worker_id)
                    .values(last_seen_at=utcnow(), current_job_id=current_job).execution_options(synchronize_session=False))
    return res.rowcount == 1


def unregister(s: Session, worker_id: str) -> None:
    s.execute(delete(Worker).where(Worker.id == worker_id))


def alive(s: Session, ttl_seconds: float) -> list[Worker]:
    """Workers seen within ``ttl_seconds``, biggest first."""
    cutoff = utcnow() - timedelta(seconds=ttl_seconds)
    return list(s.scalars(select(Worker).where(Worker.last_seen_at >= cutoff).order_by(Worker.memory_bytes.desc(), Worker.id)))


def largest_memory(s: Session, ttl_seconds: float) -> int | None:
    """The memory of the biggest live worker; None when none is registered."""
    cutoff = utcnow() - timedelta(seconds=ttl_seconds)
    return s.scalar(select(func.max(Worker.memory_bytes)).where(Worker.last_seen_at >= cutoff))


def admit(s: Session, estimate_bytes: int | None, ttl_seconds: float) -> None:
    """Raise TooLarge (422) when no live worker has the memory the job needs; pass with no workers or no estimate."""
    if not estimate_bytes:
        return
    largest = largest_memory(s, ttl_seconds)
    if largest is not None and estimate_bytes > largest:
        raise TooLarge(
            f"The job needs about {estimate_bytes / GIB:.1f} GiB of memory; the largest worker on the farm has "
            f"{largest / GIB:.1f} GiB. Use a smaller calibration (num_samples, seq_len) or add a bigger worker.",
            details={"estimate_bytes": int(estimate_bytes), "largest_worker_bytes": int(largest)},
        )


def forget_dead(s: Session, older_than_seconds: float) -> int:
    """Remove workers not seen for ``older_than_seconds``; return how many."""
    return s.execute(delete(Worker).where(Worker.last_seen_at < utcnow() - timedelta(seconds=older_than_seconds))).rowcount


def farm_view(s: Session, ttl_seconds: float, *, admin: bool) -> dict[str, Any]:
    """Utilization and queue depth for everyone; which team's job runs where only for admins."""
    workers = alive(s, ttl_seconds)
    queued = s.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED.value)) or 0
    running = s.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING.value)) or 0
    busy = [w for w in workers if w.current_job_id]
    out: dict[str, Any] = {
        "workers": len(workers), "busy": len(busy), "idle": len(workers) - len(busy),
        "utilization": round(len(busy) / len(workers), 3) if workers else 0.0,
        "queue_depth": queued, "running": running,
        "memory_bytes": {"largest": max((w.memory_bytes for w in workers), default=None), "total": sum(w.memory_bytes for w in workers)},
        "devices": dict(Counter(w.device for w in workers)),
    }
    if admin:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_([w.current_job_id for w in busy])))}
        teams = dict(s.execute(select(Team.id, Team.name).where(Team.id.in_({j.team_id for j in jobs.values()}))).all())
        out["items"] = [worker_view(w, jobs.get(w.current_job_id), teams) for w in workers]
    return out


def worker_view(w: Worker, job: Job | None, teams: dict[str, str]) -> dict[str, Any]:
    from storage.views import iso

    return {
        "id": w.id, "hostname": w.hostname, "device": w.device, "memory_bytes": w.memory_bytes,
        "methods": w.methods, "formats": w.formats, "engine_version": w.engine_version,
        "started_at": iso(w.started_at), "last_seen_at": iso(w.last_seen_at),
        "job": None if job is None else {"id": job.id, "team_id": job.team_id, "team": teams.get(job.team_id), "method": job.method},
    }
