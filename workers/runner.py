"""One job end to end: claim → fetch → quantize → export → evaluate → publish.

A plain object (no Celery) that the thin task calls and the tests drive. Every
way a job can end is turned into a state here, in one place: success, a job
error (failed with its code), cancellation, a lost lease (stop quietly), or an
unexpected exception (failed with ``internal_error``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from quantfarm.errors import InvalidState, JobCancelled, LeaseLost, ModelNotFound, QuantfarmError
from quantfarm.settings import Settings
from quantfarm.spec import load_spec
from quantfarm.store import BlobStore, PrefixedStore
from storage import jobs
from storage.db import Database
from storage.jobs import JobStatus, Stage
from storage.models import Artifact, new_id
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)


def artifact_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/artifact"


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobRunner:
    """Runs jobs for one worker process."""

    def __init__(self, settings: Settings, db: Database, store: BlobStore, *, owner: str | None = None):
        self.settings = settings
        self.db = db
        self.store = store
        self.owner = owner or default_owner()

    # --- the one entry point -----------------------------------------------------

    def run(self, job_id: str) -> str:
        """Claim and run ``job_id``; return the status it ended in (or 'skipped')."""
        with self.db.session() as s:
            job = jobs.claim(s, job_id, self.owner, self.settings.lease_seconds)
        if job is None:
            log.info("job %s: not claimable (already taken or not queued); skipping", job_id)
            return "skipped"
        log.info("job %s: claimed by %s (attempt %d)", job_id, self.owner, job.attempt)
        scratch = self.settings.resolved_scratch_dir / job_id / uuid.uuid4().hex[:8]
        hb = Heartbeat(self.db, job_id, self.owner, self.settings.lease_seconds, self.settings.heartbeat_interval)
        try:
            with hb, contextlib.ExitStack() as hold:
                return self._run(job, scratch, hb, hold)
        except LeaseLost:
            log.warning("job %s: another worker owns it now; leaving it alone", job_id)
            return "lease_lost"
        except JobCancelled:
            return self._end(job_id, JobStatus.CANCELLED, message="Cancelled at a layer boundary; checkpoints kept for retry")
        except QuantfarmError as exc:
            log.warning("job %s failed: %s: %s", job_id, exc.code, exc.message)
            return self._end(job_id, JobStatus.FAILED, error_code=exc.code, error_message=exc.message)
        except Exception as exc:  # the job must never be left silently running
            log.exception("job %s: unexpected error", job_id)
            return self._end(
                job_id, JobStatus.FAILED, error_code="internal_error",
                error_message=f"The worker hit an unexpected error ({type(exc).__name__}: {str(exc)[:300]}); see the worker log.",
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- stages --------------------------------------------------------------------

    def _run(self, job, scratch: Path, hb: Heartbeat, hold: contextlib.ExitStack) -> str:
        import torch

        from workers.engine.model import resolve_device
        from workers.engine.pipeline import QuantizeRequest
        from workers.engine.run import quantize

        spec = load_spec(job.spec, job.secrets)
        started = time.monotonic()
        self._stage(job.id, Stage.FETCHING)
        fetched = self._fetch(spec, scratch, hold)
        source_dir = fetched.path

        def on_layer(report) -> None:
            if hb.lost:
                raise LeaseLost(f"Job {job.id} lease lost")
            hb.beat()  # renew and pick up cancel requests at every layer boundary
            with self.db.session() as s:
                jobs.set_progress(
                    s, job.id, self.owner, done=report.index + 1, total=report.total, eta=report.eta_seconds,
                    data={"seconds": round(report.seconds, 3), "resumed": report.resumed, "losses": report.losses},
                )
            if hb.cancel_requested:
                raise JobCancelled(f"Job {job.id} cancelled")

        def on_stage(name: str) -> None:
            self._stage(job.id, Stage(name))

        req = QuantizeRequest(
            source_dir=source_dir, method=spec.method, options=spec.options, calibration=spec.calibration,
            evaluate=spec.evaluate, evaluation=spec.evaluation, base_model=self._base_model(spec),
            read_upload=self._read_upload, source_revision=fetched.revision if fetched.source != "local" else None,
        )
        out_dir = scratch / "out"
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        result = quantize(
            req, PrefixedStore(self.store, checkpoint_prefix(job.id)), out_dir,
            device=resolve_device(self.settings.device), on_layer=on_layer, on_stage=on_stage,
            max_shard_bytes=self.settings.max_shard_bytes,
        )
        from workers.gate import gate_message, gate_verdict

        verdict = gate_verdict(spec.gate, result.metrics)
        passed = verdict is None or verdict["passed"]
        self._stage(job.id, Stage.UPLOADING)
        keep = spec.destination.store or not passed  # a failed gate's artifact is always kept, never published
        entries = self.store.upload_dir(artifact_prefix(job.id), out_dir) if keep else []
        hub_url = hub_commit = None
        if spec.destination.hub is not None and passed:
            from storage.hub import publish_to_hub

            hub_url, hub_commit = publish_to_hub(out_dir, spec.destination.hub, job.secrets.get("destination.hub.token"), job.id, self.settings)
            if not entries:
                from quantfarm.store import FileEntry, sha256_file, walk_files

                entries = [FileEntry(p.relative_to(out_dir).as_posix(), p.stat().st_size, sha256_file(p)) for p in walk_files(out_dir)]
        metrics = {**result.metrics, "seconds": round(time.monotonic() - started, 3),
                   "layer_losses": {str(k): v for k, v in result.layer_losses.items()}}
        if verdict is not None:
            metrics["gate"] = verdict
        if not passed:
            self._record_artifact(job.id, result.quantization_config, entries, None, None, True, kind="gate_failed")
            return self._end(job.id, JobStatus.FAILED, error_code="quality_gate", error_message=gate_message(verdict), metrics=metrics)
        self._succeed(job.id, result.quantization_config, entries, metrics, hub_url, hub_commit, spec.destination.store)
        try:
            self.store.delete_prefix(checkpoint_prefix(job.id))
        except Exception as exc:  # the job has succeeded; stale checkpoints only cost space
            log.warning("job %s: succeeded, but its checkpoints could not be deleted (%s: %s)", job.id, type(exc).__name__, str(exc)[:200])
        return JobStatus.SUCCEEDED.value

    def _fetch(self, spec, scratch: Path, hold: contextlib.ExitStack):
        from storage.sources import fetch

        secrets = {"model.token": spec.model.token.get_secret_value()} if getattr(spec.model, "token", None) else {}
        return fetch(spec.model, secrets, self.settings, scratch, hold=hold)  # the path and the resolved revision

    def _read_upload(self, upload_id: str) -> str:
        keys = [k for k in self.store.list(f"uploads/{upload_id}/") if not k.endswith("/meta.json")]
        if not keys:
            raise ModelNotFound(f"Upload {upload_id} was not found in the store.", code="upload_not_found")
        return self.store.get_bytes(keys[0]).decode("utf-8", errors="replace")

    @staticmethod
    def _base_model(spec) -> str:
        # The card's base_model must be a Hub id (the Hub rejects anything else); other sources have none.
        return spec.model.repo_id if spec.model.source == "hub" else ""

    # --- DB writes -------------------------------------------------------------------

    def _stage(self, job_id: str, stage: Stage) -> None:
        with self.db.session() as s:
            jobs.set_stage(s, job_id, self.owner, stage)

    def _succeed(self, job_id, qconfig, entries, metrics, hub_url, hub_commit, stored: bool) -> None:
        with self.db.session() as s:
            job = jobs.get_job(s, job_id)
            s.add(self._artifact(job_id, qconfig, entries, hub_url, hub_commit, stored))
            jobs.transition(s, job, JobStatus.SUCCEEDED, owner=self.owner, message="Quantized and stored", metrics=metrics, stage=None)

    def _artifact(self, job_id, qconfig, entries, hub_url, hub_commit, stored: bool, kind: str = "model") -> Artifact:
        import hashlib

        digest = hashlib.sha256("".join(f"{e.path}\0{e.sha256}\n" for e in entries).encode()).hexdigest()
        return Artifact(
            id=new_id("art"), job_id=job_id, kind=kind, format=qconfig.get("quant_method", "unknown"),
            location=self.store.uri(artifact_prefix(job_id)) if stored else None,
            files=[e.to_dict() for e in entries], file_count=len(entries),
            size_bytes=sum(e.size for e in entries), sha256=digest, hub_url=hub_url, hub_commit=hub_commit,
        )

    def _record_artifact(self, job_id, qconfig, entries, hub_url, hub_commit, stored: bool, *, kind: str) -> None:
        with self.db.session() as s:
            s.add(self._artifact(job_id, qconfig, entries, hub_url, hub_commit, stored, kind))

    def _end(self, job_id: str, status: JobStatus, *, message: str | None = None, error_code: str | None = None,
             error_message: str | None = None, metrics: dict | None = None) -> str:
        try:
            with self.db.session() as s:
                job = jobs.get_job(s, job_id)
                changes = {"stage": None} if metrics is None else {"stage": None, "metrics": metrics}
                if error_code:
                    changes.update(error_code=error_code, error_message=error_message)
                jobs.transition(s, job, status, owner=self.owner, message=message or error_message, **changes)
        except LeaseLost:
            log.warning("job %s: lease lost before it could be marked %s", job_id, status.value)
            return "lease_lost"
        except InvalidState as exc:  # it ended already (say, succeeded before a late error): keep that
            log.warning("job %s: not marked %s: %s", job_id, status.value, exc.message)
            return "already_ended"
        return status.value
