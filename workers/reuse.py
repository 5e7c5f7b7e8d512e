"""Dedup: a job whose result exists already reuses it; identical jobs running at once coalesce.

"Identical" is the engine's own fingerprint (workers.engine.run.result_fingerprint): the
source's file hashes and revision, the normalized method and options, the calibration tokens,
the engine version, and everything else that shapes the artifact's bytes (formats, evaluation,
card, gate). It is known only once this worker has fetched the source with the job's own
credentials, so a match proves the job could read every input itself: that is what lets a
result cross from one team to another. Another team's job id is never written where the
caller can read it (``reused_from`` says ``another_team``, the files are copied under the
job's own key prefix). An artifact that failed its quality gate carries no fingerprint, so it
is never reused; ``"reuse": false`` neither reuses nor waits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from quantfarm.errors import JobCancelled, LeaseLost, StorageUnavailable
from quantfarm.paths import safe_join
from quantfarm.store import PrefixedStore, sha256_file
from storage import jobs
from storage.jobs import JobStatus, Lease, Stage
from storage.layout import checkpoint_prefix
from storage.models import Artifact, Job

log = logging.getLogger(__name__)

ANOTHER_TEAM = "another_team"
POLL_SECONDS = 1.0  # how often a coalesced job looks at the one it waits for


@dataclass
class Reused:
    """What ``JobRunner._run`` records for a reused result: the original's figures, no layer of its own."""

    metrics: dict
    layer_losses: dict = field(default_factory=dict)


def fingerprint_of(spec, req, device, checkpoints=None) -> str:
    """The job's result fingerprint; ``checkpoints``: the job's checkpoint store (a resumed job computes, and so
    fingerprints, in the dtype its checkpoints recorded, whatever this worker would choose)."""
    from workers.engine.run import result_fingerprint

    gate = spec.gate.model_dump(mode="json") if spec.gate is not None else None
    return result_fingerprint(req, device, extra={"gate": gate}, checkpoint_store=checkpoints)


def find_reusable(s: Session, job: Job, fp: str) -> list[tuple[Job, list[Artifact]]]:
    """Succeeded jobs with this fingerprint and every artifact in the store: the team's own first, newest first."""
    rows = s.execute(
        select(Artifact, Job).join(Job, Job.id == Artifact.job_id)
        .where(Artifact.fingerprint == fp, Job.status == JobStatus.SUCCEEDED.value, Job.id != job.id)
        .order_by(Job.finished_at.desc(), Artifact.created_at)
    ).all()
    found: dict[str, tuple[Job, list[Artifact]]] = {}
    for art, owner in rows:
        found.setdefault(owner.id, (owner, []))[1].append(art)
    usable = [(o, arts) for o, arts in found.values()
              if all(a.store_prefix and not a.kind.startswith("gate_failed") for a in arts)
              and len(arts) == len(o.spec.get("formats") or [None])]
    usable.sort(key=lambda pair: pair[0].team_id != job.team_id)  # stable: newest within each group
    return usable


def _present(store, arts: list[Artifact]) -> bool:
    """Whether every file of ``arts`` is still in the store (retention may have removed them)."""
    return all(store.exists(f"{a.store_prefix}/{f['path']}") for a in arts for f in a.files)


def one_at_a_time(s: Session, fp: str) -> None:
    """Serialize the decisions about one fingerprint until the transaction ends."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:fp))"), {"fp": fp})
    else:  # SQLite: the write lock, taken before any read so the transaction never has to upgrade
        s.execute(text("UPDATE jobs SET id = id WHERE 0"))


def lead_or_follow(s: Session, job_id: str, lease: Lease, fp: str) -> str | None:
    """Record that this job computes ``fp``, unless an identical job computes it now: return that one's id.

    Call under ``one_at_a_time``, so two identical jobs cannot both decide to compute.
    """
    leader = s.scalar(select(Job.id).where(Job.fingerprint == fp, Job.status == JobStatus.RUNNING.value, Job.id != job_id)
                      .order_by(Job.started_at).limit(1))
    if leader is None:
        jobs.owned_update(s, job_id, lease, fingerprint=fp, reused_from=None)
    return leader


def settle(runner, job, spec, req, hb) -> tuple[Job, list[Artifact]] | None:
    """Find a result to reuse, waiting while an identical job computes one; None: compute it here."""
    from workers.engine.model import resolve_device

    fp = fingerprint_of(spec, req, resolve_device(runner.settings.device), PrefixedStore(runner.store, checkpoint_prefix(job.id)))
    waited_for = None
    while True:
        with runner.db.session() as s:
            one_at_a_time(s, fp)
            found = next((c for c in find_reusable(s, jobs.get_job(s, job.id), fp) if _present(runner.store, c[1])), None)
            if found is not None:
                jobs.owned_update(s, job.id, runner.lease, fingerprint=fp)
                s.expunge_all()
                return found
            leader = lead_or_follow(s, job.id, runner.lease, fp)
            if leader is not None and leader != waited_for:
                foreign = s.scalar(select(Job.team_id).where(Job.id == leader)) != job.team_id
                jobs.add_event(s, job.id, "log", message="An identical job is running; waiting for its result",
                               data={"coalesced_onto": ANOTHER_TEAM if foreign else leader})
        if leader is None:
            return None
        log.info("job %s: waiting for identical job %s", job.id, leader)
        waited_for = leader
        _wait_while_running(runner, leader, hb)


def _wait_while_running(runner, leader: str, hb) -> None:
    """Sleep until ``leader`` leaves running; a cancel, a lost lease or a SIGTERM ends the wait."""
    from workers.fencing import Preempted

    while True:
        runner.progress()  # waiting for an identical job is progress: its own watchdog judges it
        if runner.preempting:
            raise Preempted(runner.current_job)
        if hb.lost:
            raise LeaseLost(f"Job {runner.current_job} lease lost while waiting")
        if hb.cancel_requested:
            raise JobCancelled(f"Job {runner.current_job} cancelled while waiting for an identical job")
        with runner.db.session() as s:
            if s.scalar(select(Job.status).where(Job.id == leader)) != JobStatus.RUNNING.value:
                return
        time.sleep(POLL_SECONDS)


def reuse(runner, job, spec, secrets: dict, found: tuple[Job, list[Artifact]], scratch: Path, hb) -> tuple[Reused, list[dict]]:
    """Copy the found artifact's files (checked against their sha256) and publish them as this job's own."""
    original, arts = found
    runner._stage(job.id, Stage.UPLOADING)
    outs = []
    for i, art in enumerate(arts):
        dest = scratch / "reused" / str(i)
        for f in art.files:
            target = safe_join(dest, f["path"])
            runner.store.get_file(f"{art.store_prefix}/{f['path']}", target)
            if sha256_file(target) != f["sha256"]:
                raise StorageUnavailable(f"A stored file of the result being reused ({f['path']}) does not match its sha256; "
                                         "retry the job with \"reuse\": false.")
            runner.progress()
        outs.append(SimpleNamespace(format=art.format, out_dir=dest))
    published = [runner._publish(job, spec, secrets, hb, i, out) for i, out in enumerate(outs)]
    same_team = original.team_id == job.team_id
    with runner.db.session() as s:
        jobs.owned_update(s, job.id, runner.lease, reused_from=original.id if same_team else ANOTHER_TEAM)
    log.info("job %s: reused the result of job %s (team %s)", job.id, original.id, original.team_id)
    kept = {k: v for k, v in (original.metrics or {}).items() if k not in ("seconds", "layer_losses")}
    losses = {int(k): v for k, v in (original.metrics or {}).get("layer_losses", {}).items()}
    return Reused({**kept, "reused": True}, losses), published

