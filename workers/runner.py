"""One job end to end: claim → fetch → quantize → export → evaluate → publish.

A plain object (no Celery) that the thin task calls and the tests drive. Every
way a job can end is turned into a state here, in one place: success, a job
error (failed with its code), cancellation, a lost lease (stop quietly), or an
unexpected exception (failed with ``internal_error``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from quantfarm.errors import InvalidState, JobCancelled, LeaseLost, ModelNotFound, QuantfarmError
from quantfarm.logs import job_context
from quantfarm.settings import Settings
from quantfarm.spec import load_spec
from quantfarm.store import BlobStore
from storage import jobs
from storage.db import Database
from storage.jobs import JobStatus, Lease, Stage
from storage.layout import artifact_prefix, checkpoint_prefix, upload_meta_key, upload_prefix
from storage.models import Artifact, new_id
from storage.retention import erase_run_secrets
from storage.teams import job_credentials
from workers import metrics as worker_metrics
from workers.fencing import FencedStore, HandOn, Preempted, default_owner, disk_full
from workers.heartbeat import Heartbeat
from workers.watchdog import CancelledAnywhere, Interrupter, Stalled, Watchdog

log = logging.getLogger(__name__)


class JobRunner:
    """Runs jobs for one worker process: claims the best runnable job, runs it, looks for more."""

    def __init__(self, settings: Settings, db: Database, store: BlobStore, *, owner: str | None = None, wake=None):
        self.settings = settings
        self.db = db
        self.store = store
        self.owner = owner or default_owner()
        self.wake = wake  # sends a wake-up (a job id as hint) so another worker takes a job we hand back
        self.lease: Lease | None = None  # the claim held now (its fencing token rides on every write)
        self.current_job: str | None = None
        self.interrupter = Interrupter()  # the watchdog stops the job mid-stage through it
        self.last_progress = time.monotonic()
        self.stage: Stage | None = None
        self.device_name, self.memory = self._offer()
        self.preempting = False  # set from a signal handler: a plain flag, no locks
        self._draining = threading.Lock()  # wake-ups and the poller take turns running jobs

    # --- entry points ----------------------------------------------------------------

    def drain(self, wait: bool = True) -> list[tuple[str, str]] | None:
        """Run the best runnable job, then the next, until none is left or we are preempted; the jobs run.

        One caller at a time (a wake-up or the poller); ``wait=False`` returns None at once when another drains.
        """
        if not self._draining.acquire(blocking=wait):
            return None
        try:
            done = []
            while not self.preempting:
                job = self._claim()
                if job is None:
                    break
                done.append((job.id, self._execute(job)))
            return done
        finally:
            self._draining.release()

    def run(self, job_id: str) -> str:
        """Claim ``job_id`` itself and run it; return the status it ended in (or 'skipped')."""
        job = self._claim(only=job_id)
        if job is None:
            log.info("job %s: not claimable (already taken, not queued, or over its team's limit); skipping", job_id)
            return "skipped"
        return self._execute(job)

    def progress(self) -> None:
        """Note that the job moved (a stage, a layer, bytes): the stall watchdog counts from here."""
        self.last_progress = time.monotonic()

    def mark_stalled(self, job_id: str, quiet_seconds: float) -> bool:
        """Requeue (or fail) the stalled job under our lease; return whether it was still ours."""
        try:
            with self.db.session() as s:
                to = jobs.give_up_stalled(s, jobs.get_job(s, job_id), self.lease, self.settings.max_attempts, quiet_seconds)
        except (LeaseLost, InvalidState):
            return False
        if to == JobStatus.QUEUED and self.wake is not None:
            try:
                self.wake(job_id)
            except Exception:
                log.exception("job %s: could not send a wake-up", job_id)
        return True

    def _offer(self) -> tuple[str, int]:
        from workers.presence import detect_memory

        device, memory = detect_memory(self.settings.device)
        return device, self.settings.worker_memory_bytes or memory

    def _claim(self, only: str | None = None):
        from storage.scheduler import claim_next

        return self.db.run(lambda s: claim_next(s, self.owner, self.settings.lease_seconds, only=only, memory=self.memory,
                                                window_seconds=self.settings.fair_share_window_seconds), what="claim")

    def _execute(self, job) -> str:
        """Run a claimed job with every log line naming it, and time the attempt."""
        started = time.monotonic()
        with job_context(job.id, job.attempt):
            status = self._execute_claimed(job)
        worker_metrics.JOB_SECONDS.labels(job.method, status).observe(time.monotonic() - started)
        return status

    def _execute_claimed(self, job) -> str:
        """Run a claimed job; turn every way it can end into a state."""
        job_id = job.id
        self.lease, self.current_job = Lease(self.owner, job.claim), job_id
        log.info("job %s: claimed by %s (attempt %d, claim %d)", job_id, self.owner, job.attempt, job.claim)
        scratch = self.settings.resolved_scratch_dir / job_id / uuid.uuid4().hex[:8]
        self.progress()
        hb = Watchdog(self.db, job_id, self.lease, self.settings.lease_seconds, self.settings.heartbeat_interval, runner=self)
        try:
            with hb, contextlib.ExitStack() as hold:
                return self._run(job, scratch, hb, hold)
        except LeaseLost:
            log.warning("job %s: another worker owns it now; leaving it alone", job_id)
            return "lease_lost"
        except Stalled:
            log.warning("job %s: stalled; handed back", job_id)
            return "stalled"
        except Preempted:
            return self._release(job_id, f"Worker {self.owner} stopping; requeued without spending an attempt", "preempted")
        except HandOn as exc:
            return self._release(job_id, str(exc), "handed_on")
        except JobCancelled as exc:
            where = exc.message if isinstance(exc, CancelledAnywhere) else "Cancelled at a layer boundary; checkpoints kept for retry"
            return self._end(job_id, JobStatus.CANCELLED, message=where)
        except QuantfarmError as exc:
            log.warning("job %s failed: %s: %s", job_id, exc.code, exc.message)
            return self._end(job_id, JobStatus.FAILED, error_code=exc.code, error_message=exc.message)
        except Exception as exc:  # the job must never be left silently running
            if disk_full(exc):  # its checkpoints are in the store, whole: a retry resumes from them on any worker
                log.warning("job %s: scratch disk %s is full", job_id, self.settings.resolved_scratch_dir)
                return self._end(job_id, JobStatus.FAILED, error_code="scratch_full", error_message=(
                    "The worker's scratch disk is full; retry the job: it resumes from its checkpoints on any worker."))
            log.exception("job %s: unexpected error", job_id)
            return self._end(
                job_id, JobStatus.FAILED, error_code="internal_error",
                error_message=f"The worker hit an unexpected error ({type(exc).__name__}: {str(exc)[:300]}); see the worker log.",
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            self.lease = self.current_job = None

    # --- stages --------------------------------------------------------------------

    def _run(self, job, scratch: Path, hb: Heartbeat, hold: contextlib.ExitStack) -> str:
        spec = load_spec(job.spec, job.secrets)
        with self.db.session() as s:  # the team credentials its credentials_ref fields name, read now
            secrets = {**(job.secrets or {}), **job_credentials(s, job)}
        started = time.monotonic()
        self.interrupter.arm()  # from here to the last upload, a cancel or a stall stops the job mid-stage
        try:
            result, published = self._produce(job, spec, secrets, scratch, hb, hold)
        finally:
            self.interrupter.disarm()
        metrics = {**result.metrics, "seconds": round(time.monotonic() - started, 3),
                   "layer_losses": {str(k): v for k, v in result.layer_losses.items()}}
        verdict = result.metrics.get("gate")
        if verdict is not None and not verdict["passed"]:  # kept and marked, never published
            from workers.gate import gate_message

            self._succeed(job.id, published, metrics, failed_gate=gate_message(verdict))
            return JobStatus.FAILED.value
        self._succeed(job.id, published, metrics)
        try:
            self.store.delete_prefix(checkpoint_prefix(job.id))
        except Exception as exc:  # the job has succeeded; stale checkpoints only cost space
            log.warning("job %s: succeeded, but its checkpoints could not be deleted (%s: %s)", job.id, type(exc).__name__, str(exc)[:200])
        return JobStatus.SUCCEEDED.value

    def _produce(self, job, spec, secrets: dict, scratch: Path, hb: Heartbeat, hold: contextlib.ExitStack):
        """Fetch, quantize, export, evaluate, upload and publish; return what the success records."""
        import torch

        from workers.engine.model import prefer_cpu_bf16, resolve_device
        from workers.engine.pipeline import QuantizeRequest
        from workers.engine.run import quantize

        prefer_cpu_bf16(self.settings.cpu_bf16)  # before the reuse fingerprint, which records the compute dtype
        self._stage(job.id, Stage.FETCHING)
        fetched = self._fetch(spec, secrets, scratch, hold)
        source_dir = fetched.path
        req = QuantizeRequest(
            source_dir=source_dir, method=spec.method, options=spec.options, calibration=spec.calibration,
            evaluate=spec.evaluate, evaluation=spec.evaluation, base_model=self._base_model(spec),
            read_upload=self._read_upload, hub_token=secrets.get("calibration.token"), formats=list(spec.formats),
            source_revision=fetched.revision if fetched.source != "local" else None, gate=spec.gate,
        )
        if spec.reuse:  # an identical result (made, or being made) is copied instead of computed
            from workers import reuse

            found = reuse.settle(self, job, spec, req, hb)
            if found is not None:
                return reuse.reuse(self, job, spec, secrets, found, scratch, hb)
        self._admit(job, source_dir)

        def on_layer(report) -> None:
            if hb.lost:
                raise LeaseLost(f"Job {job.id} lease lost")
            self.progress()
            hb.beat()  # renew and pick up cancel requests at every layer boundary
            if not report.resumed:
                worker_metrics.LAYER_SECONDS.labels(spec.method).observe(report.seconds)
            self.db.run(lambda s: jobs.set_progress(
                s, job.id, self.lease, done=report.index + 1, total=report.total, eta=report.eta_seconds,
                data={"seconds": round(report.seconds, 3), "resumed": report.resumed, "losses": report.losses},
            ), what=f"job {job.id} progress")
            if hb.cancel_requested:
                raise JobCancelled(f"Job {job.id} cancelled")
            if self.preempting:  # this layer's checkpoint is written: hand the job on from here
                raise Preempted(job.id)

        def on_stage(name: str) -> None:
            self._stage(job.id, Stage(name))

        out_dir = scratch / "out"
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        result = quantize(
            req, FencedStore(self.store, checkpoint_prefix(job.id), hb, self.progress), out_dir,
            device=resolve_device(self.settings.device), on_layer=on_layer, on_stage=on_stage,
            max_shard_bytes=self.settings.max_shard_bytes, activations_dir=scratch / "activations",
            activations_ram_bytes=self.settings.activations_ram_bytes,
        )
        from workers.gate import gate_verdict

        verdict = gate_verdict(spec.gate, result.metrics)
        if verdict is not None:
            result.metrics["gate"] = verdict
        passed = verdict is None or verdict["passed"]
        self._stage(job.id, Stage.UPLOADING)
        published = [self._publish(job, spec, secrets, hb, i, out, passed) for i, out in enumerate(result.outputs)]
        return result, published

    def _publish(self, job, spec, secrets: dict, hb: Heartbeat, index: int, out, passed: bool = True) -> dict:
        """Store and/or push one format's folder under this claim; return the artifact row's fields."""
        from quantfarm.store import FileEntry, sha256_file, walk_files

        # A stale claim writes only under its own prefix; further formats sit beside the first.
        prefix = artifact_prefix(job.id, self.lease.claim, None if index == 0 else out.format)
        keep = spec.destination.store or not passed  # a failed gate's artifact is always kept, never published
        entries = FencedStore(self.store, prefix, hb, self.progress).upload_dir("", out.out_dir) if keep else []
        hub_url = hub_commit = None
        if spec.destination.hub is not None and passed:
            from storage.hub import publish_to_hub

            dest = spec.destination.hub
            if index:  # further formats go to their own branch of the same repo
                dest = dest.model_copy(update={"branch": f"{dest.branch}-{out.format}" if dest.branch else out.format})
            self._check_fence(job.id)  # a stale claim publishes nothing
            hub_url, hub_commit = publish_to_hub(out.out_dir, dest, secrets.get("destination.hub.token"), job.id, self.settings)
            if not entries:
                entries = [FileEntry(p.relative_to(out.out_dir).as_posix(), p.stat().st_size, sha256_file(p)) for p in walk_files(out.out_dir)]
        kind = ("model" if index == 0 else out.format) if passed else ("gate_failed" if index == 0 else f"gate_failed-{out.format}")[:20]
        return {"kind": kind, "format": out.format, "entries": entries,
                "prefix": prefix if keep else None, "hub_url": hub_url, "hub_commit": hub_commit}

    def _fetch(self, spec, secrets: dict, scratch: Path, hold: contextlib.ExitStack):
        from storage.sources import fetch

        # Only the job's own credentials: a pasted token, or a team credential (model.token / model.s3).
        return fetch(spec.model, {k: v for k, v in secrets.items() if k in ("model.token", "model.s3")},
                     self.settings, scratch, hold=hold)  # the path and the resolved revision

    def _read_upload(self, upload_id: str) -> str:
        keys = [k for k in self.store.list(upload_prefix(upload_id) + "/") if k != upload_meta_key(upload_id)]
        if not keys:
            raise ModelNotFound(f"Upload {upload_id} was not found in the store.", code="upload_not_found")
        return self.store.get_bytes(keys[0]).decode("utf-8", errors="replace")

    @staticmethod
    def _base_model(spec) -> str:
        # The card's base_model must be a Hub id (the Hub rejects anything else); other sources have none.
        return spec.model.repo_id if spec.model.source == "hub" else ""

    # --- DB writes -------------------------------------------------------------------

    def _stage(self, job_id: str, stage: Stage) -> None:
        self.progress()
        self.stage = stage
        if self.preempting:
            raise Preempted(job_id)
        self.db.run(lambda s: jobs.set_stage(s, job_id, self.lease, stage), what=f"job {job_id} stage")

    def _check_fence(self, job_id: str) -> None:
        with self.db.session() as s:
            jobs.check_fence(s, job_id, self.lease)

    def _succeed(self, job_id, published: list[dict], metrics, *, failed_gate: str | None = None) -> None:
        import hashlib

        source = metrics.get("source") or {}

        def write(s) -> None:
            job = jobs.get_job(s, job_id)
            for a in published:  # one artifact per format: kind "model" for the first, the format's name after
                entries, prefix = a["entries"], a["prefix"]
                digest = hashlib.sha256("".join(f"{e.path}\0{e.sha256}\n" for e in entries).encode()).hexdigest()
                s.add(Artifact(
                    id=new_id("art"), job_id=job_id, kind=a["kind"], format=a["format"],
                    location=self.store.uri(prefix) if prefix else None, store_prefix=prefix,
                    files=[e.to_dict() for e in entries], file_count=len(entries),
                    size_bytes=sum(e.size for e in entries), sha256=digest, hub_url=a["hub_url"], hub_commit=a["hub_commit"],
                    source_revision=source.get("revision"), source_files=source.get("files"),
                    fingerprint=None if failed_gate else job.fingerprint,  # a failed gate's artifact is never reused
                ))
            # Fenced: a stale claim's transition fails, and the artifact row above rolls back with it.
            if failed_gate:  # the artifacts stay (marked gate_failed); the job fails with the numbers
                jobs.transition(s, job, JobStatus.FAILED, lease=self.lease, message=failed_gate, metrics=metrics, stage=None,
                                error_code="quality_gate", error_message=failed_gate)
            else:
                jobs.transition(s, job, JobStatus.SUCCEEDED, lease=self.lease, message="Quantized and stored", metrics=metrics, stage=None)
            erase_run_secrets(s, job_id)  # after the webhooks were made (they scrub with every secret)

        self.db.run(write, what=f"job {job_id} success")

    def _admit(self, job, source_dir: Path) -> None:
        """Estimate the job's memory from its config.json; fail it if no worker fits, hand it on if we do not."""
        import json

        from quantfarm.errors import TooLarge
        from quantfarm.memory import estimate_for_spec
        from storage import farm

        try:
            estimate = estimate_for_spec(json.loads((source_dir / "config.json").read_text()), job.spec)
        except (OSError, ValueError):
            return  # the engine reports an unreadable model with its own error
        if estimate is None:
            return
        with self.db.session() as s:
            jobs.owned_update(s, job.id, self.lease, memory_estimate=estimate)
            largest = max(farm.largest_memory(s, self.settings.worker_ttl_seconds) or 0, self.memory)
        if estimate > largest:
            raise TooLarge(f"The job needs about {estimate / 1024**3:.1f} GiB of memory; the largest worker on the farm has "
                           f"{largest / 1024**3:.1f} GiB.", details={"estimate_bytes": estimate, "largest_worker_bytes": largest})
        if estimate > self.memory:
            raise HandOn(f"Needs about {estimate / 1024**3:.2f} GiB; worker {self.owner} has {self.memory / 1024**3:.2f} GiB: "
                         "requeued for a bigger worker")

    def _release(self, job_id: str, reason: str, why: str) -> str:
        """Hand the job back to the queue at once (preempted, or too big for us); the next claim resumes it."""
        try:
            with self.db.session() as s:
                jobs.release(s, jobs.get_job(s, job_id), self.lease, reason, why=why)
        except (LeaseLost, InvalidState) as exc:
            log.warning("job %s: not released: %s", job_id, exc)
            return "lease_lost"
        log.warning("job %s: %s; requeued", job_id, why)
        try:
            if self.wake is not None:
                self.wake(job_id)
        except Exception:  # broker down: the sweeper's wake-ups cover it
            log.exception("job %s: could not send a wake-up", job_id)
        return why

    def _end(self, job_id: str, status: JobStatus, *, message: str | None = None, error_code: str | None = None, error_message: str | None = None) -> str:
        changes = {"stage": None}
        if error_code:
            changes.update(error_code=error_code, error_message=error_message)
        try:
            self.db.run(lambda s: jobs.transition(s, jobs.get_job(s, job_id), status, lease=self.lease,
                                                  message=message or error_message, **changes), what=f"job {job_id} end")
        except LeaseLost:
            log.warning("job %s: lease lost before it could be marked %s", job_id, status.value)
            return "lease_lost"
        except InvalidState as exc:  # it ended already (say, succeeded before a late error): keep that
            log.warning("job %s: not marked %s: %s", job_id, status.value, exc.message)
            return "already_ended"
        try:
            self.store.delete_prefix(artifact_prefix(job_id, self.lease.claim))  # what a cut-short upload left
        except Exception:
            log.warning("job %s: could not delete a partial upload", job_id, exc_info=True)
        return status.value
