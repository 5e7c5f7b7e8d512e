"""One typed settings object, read from ``QUANTFARM_*`` variables at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a process of the farm can be configured with.

    Build it once with ``Settings()`` (or ``load_settings``) when a process starts
    and pass it down; nothing reads the environment at import time.
    """

    model_config = SettingsConfigDict(env_prefix="QUANTFARM_", env_file=None, extra="ignore")

    # Logs: "text" for people, "json" (one object a line, with job_id and attempt) for log pipelines.
    log_format: Literal["text", "json"] = "text"

    # Where embedded state lives (SQLite file, broker folders, artifacts, scratch).
    home: Path = Path(".quantfarm")
    database_url: str | None = None
    broker_url: str | None = None

    # HTTP API
    host: str = "127.0.0.1"
    port: int = 8000
    url: str | None = None  # what the CLI talks to; defaults to http://host:port
    api_key: SecretStr | None = None  # what the CLI sends as its Bearer key
    # `quantfarm run`: how long children get to stop after SIGTERM, and to come up at start.
    stop_grace_seconds: float = Field(default=30.0, gt=0)
    startup_timeout_seconds: float = Field(default=120.0, gt=0)
    max_upload_bytes: int = 64 * 1024 * 1024  # largest calibration file POST /v1/uploads takes

    # Artifact store
    store: Literal["local", "s3"] = "local"
    artifact_dir: Path | None = None
    s3_bucket: str = "quantfarm"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    # Where clients reach the store, when that differs from where the farm does (an internal
    # MinIO hostname, say): presigned download URLs are signed for this endpoint.
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = True
    s3_max_attempts: int = 5
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 30.0
    # Seconds a submit may spend reading a Hub or S3 model's config.json for its memory estimate (0: never).
    submit_peek_seconds: float = Field(default=5.0, ge=0, le=60)
    s3_multipart_threshold: int = 64 * 1024 * 1024
    s3_multipart_chunksize: int = 16 * 1024 * 1024
    presign_downloads: bool = False
    # How long a starting process waits for an unreachable store before it gives up.
    store_startup_wait_seconds: float = 60.0

    # Workers
    scratch_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int | None = None
    # Compute a bf16 model in bf16 on CPU: unset (None) where the CPU multiplies bf16 in hardware (AMX,
    # AVX512-BF16), float32 elsewhere; true/false force it. A resumed job keeps its checkpoints' dtype.
    cpu_bf16: bool | None = None
    lease_seconds: float = 60.0
    heartbeat_seconds: float | None = None  # default: a third of the lease
    sweep_seconds: float = 10.0
    # Scheduler: a queued job waiting this long gets a wake-up from the sweeper (at most
    # wakeup_batch per interval, never one per job); fair share looks back this far.
    requeue_queued_after_seconds: float = 600.0
    wakeup_batch: int = Field(default=4, ge=1)
    # What this worker offers the scheduler (None: the GPU's memory, or RAM on CPU), and how
    # often it says it lives; a worker unseen for 3 beats is not counted by admission.
    worker_memory_bytes: int | None = Field(default=None, gt=0)
    worker_beat_seconds: float = Field(default=15.0, gt=0)
    # An idle worker looks for queued jobs in the database this often, wake-up or not (a
    # restarted broker loses its messages); a wake-up still starts a job at once.
    worker_poll_seconds: float = Field(default=10.0, gt=0)
    # A running job none of whose progress signals (stage, layer, bytes) moved for this long,
    # though its heartbeat runs, is stalled: requeued (spending an attempt), or failed `stalled`.
    stall_seconds: float = Field(default=1800.0, gt=0)
    fair_share_window_seconds: float = Field(default=24 * 3600.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    # How long a worker retries its database calls (with backoff) while the database is unreachable.
    db_retry_seconds: float = 30.0
    max_shard_bytes: int = 2 * 1024**3
    # Calibration and evaluation activations a job keeps in RAM (all its batches together); the batches
    # beyond go to files in its scratch folder, read back one at a time (quantfarm/memory.py counts this).
    activations_ram_bytes: int = Field(default=64 * 1024**2, ge=0)
    model_cache_bytes: int = 50 * 1024**3
    metrics_port: int | None = None  # a worker serves its Prometheus metrics here when set
    queue: str = "quantfarm"  # long quantization jobs, one per worker
    service_queue: str = "quantfarm-service"  # sweeps and webhook deliveries, never stuck behind a job

    # Webhooks
    webhook_allow_private: bool = False
    webhook_timeout: float = 15.0  # total deadline of one attempt (connect, send, answer), like Standard Webhooks senders
    webhook_threads: int = Field(default=16, ge=1)  # attempts in flight at once per service process
    webhook_max_attempts: int = 8
    webhook_backoff_base: float = 2.0
    webhook_backoff_max: float = 3600.0

    # Hub
    hf_endpoint: str | None = None
    # A publish goes up in commits of at most this many bytes (weights first, card and config
    # last); a retry re-reads the branch and sends only the files not there yet.
    hub_commit_bytes: int = Field(default=4 * 1024**3, gt=0)

    # Identity and trust
    # auto: while no API key exists and the API listens on a loopback address, requests act as
    # a local admin; on: every request needs a key; off: nobody needs one (loopback only).
    auth: Literal["auto", "on", "off"] = "auto"
    # Fernet keys, newest first, comma-separated (see quantfarm.secrets); the embedded stack makes its own.
    secret_key: SecretStr | None = None
    # Host names the API answers to (Flask TRUSTED_HOSTS); empty: loopback names when bound to loopback.
    trusted_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Folders a `local` model source may name (a job can read nothing else on a worker's disk).
    local_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Queued jobs one team may have at once; over it, submit is a 429.
    team_max_queued: int = Field(default=100, ge=1)
    # Days a failed or cancelled job stays retryable; its encrypted secrets are erased after it.
    retry_window: float = Field(default=7.0, gt=0)
    # Garbage collection (`quantfarm gc`, and the service every gc_every_seconds): ages past which
    # uploads no job can still read, scratch folders of jobs not running, progress events of ended
    # jobs and finished webhook deliveries are removed.
    gc_every_seconds: float = Field(default=3600.0, gt=0)
    gc_uploads_days: float = Field(default=7.0, gt=0)
    gc_scratch_hours: float = Field(default=24.0, gt=0)
    gc_events_days: float = Field(default=90.0, gt=0)
    gc_deliveries_days: float = Field(default=30.0, gt=0)
    # Seconds a verified API key is trusted without reading its row again (revocation lag).
    auth_cache_seconds: float = Field(default=5.0, ge=0)

    @field_validator("trusted_hosts", "local_roots", mode="before")
    @classmethod
    def _comma_list(cls, v):
        # QUANTFARM_LOCAL_ROOTS=/models,/data reads as a list; a JSON list works too.
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'quantfarm.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.home / "artifacts").resolve()

    @property
    def resolved_scratch_dir(self) -> Path:
        return (self.scratch_dir or self.home / "scratch").resolve()

    @property
    def api_url(self) -> str:
        return (self.url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or max(self.lease_seconds / 3.0, 0.5)

    @property
    def worker_ttl_seconds(self) -> float:
        return 3 * self.worker_beat_seconds

    @property
    def loopback(self) -> bool:
        """Whether the API listens only on a loopback address."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def embedded(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem")


def load_settings(**overrides) -> Settings:
    """Build the settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)
