"""SQLAlchemy 2 models: teams, API keys, credentials, jobs, events, artifacts, webhook deliveries."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_last = [0]
_id_lock = threading.Lock()
# os.urandom's bytes, read a page at a time and handed out ten an id. A read is a system call, during which CPython lets
# another thread take the GIL; made under ``_id_lock`` on every id, it had the API's submitting threads queue on the lock
# and trade the GIL (bench.submit_cpu, 8 threads: 7.4-8.1 context switches a submit, 5.9-6.6 without it). The same kernel
# randomness, one call for ~400 ids. A forked child starts with none, so two processes never hand out the same bytes.
_RANDOM_READ = 4096
_random = bytearray()
os.register_at_fork(after_in_child=_random.clear)


def _random_int(n: int) -> int:
    """``n`` bytes of os.urandom as an int (``_id_lock`` held)."""
    if len(_random) < n:
        _random.extend(os.urandom(_RANDOM_READ))
    value = int.from_bytes(_random[:n], "big")
    del _random[:n]
    return value


def new_id(prefix: str) -> str:
    """Return a time-sortable opaque id (48-bit ms clock + 80 random bits from os.urandom, ULID-like).

    Ids made in one process are strictly increasing, also within a millisecond.
    """
    with _id_lock:
        value = (int(time.time() * 1000) << 80) | _random_int(10)
        if value <= _last[0]:
            value = _last[0] + 1
        _last[0] = value
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars)).lower()}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Store naive UTC, hand back aware UTC, on SQLite and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class EncryptedJSON(TypeDecorator):
    """A JSON value encrypted at rest with the engine's key ring (see quantfarm.secrets).

    The key ring rides on the engine's dialect (``storage.db.Database`` puts it there),
    so every process encrypts with the key its settings name and nothing is global.
    Writing a non-empty value through an engine without a key ring raises.
    """

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect) -> Any:
        if not value:
            return value
        ring = getattr(dialect, "quantfarm_keyring", None)
        if ring is None:
            raise RuntimeError("No secret key ring on this database engine; build it with Database(url, keyring=...).")
        return ring.seal(value)

    def process_result_value(self, value: Any, dialect) -> Any:
        if not value:
            return value
        ring = getattr(dialect, "quantfarm_keyring", None)
        if ring is None:
            raise RuntimeError("No secret key ring on this database engine; build it with Database(url, keyring=...).")
        return ring.open(value)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


DEFAULT_TEAM_ID = "team_default"  # jobs made before teams existed, and the local admin's


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    max_queued: Mapped[int | None] = mapped_column(Integer)  # None: the farm's QUANTFARM_TEAM_MAX_QUEUED
    max_running: Mapped[int | None] = mapped_column(Integer)  # None: no limit (enforced by the scheduler's claim)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20))  # admin | member | viewer
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the secret part; the key itself is never stored
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(40))
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Credential(Base):
    __tablename__ = "credentials"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))  # hub | s3
    secret: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (UniqueConstraint("team_id", "name", name="uq_credentials_team_name"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"), index=True)
    created_by: Mapped[str | None] = mapped_column(String(40))  # the API key's id (None: the local admin)
    status: Mapped[str] = mapped_column(String(20), index=True)
    stage: Mapped[str | None] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(20))
    model_ref: Mapped[str] = mapped_column(String(500))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    secrets: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Fencing token: rises with every claim (attempt is the retry budget); a worker's writes carry it.
    claim: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    layers_done: Mapped[int | None] = mapped_column(Integer)
    layers_total: Mapped[int | None] = mapped_column(Integer)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the retry window ended: checkpoints and secrets erased
    memory_estimate: Mapped[int | None] = mapped_column(BigInteger)  # peak bytes (quantfarm.memory); None: not known yet
    # The result's fingerprint (workers.reuse), set once a worker fetched the source and chose to compute it.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The job whose artifact this one reused: its id within the team, "another_team" across teams (ids never leak).
    reused_from: Mapped[str | None] = mapped_column(String(40))

    events: Mapped[list["JobEvent"]] = relationship(back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan")
    artifacts: Mapped[list["Artifact"]] = relationship(back_populates="job", order_by="Artifact.created_at", cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_queue", "status", "team_id", "priority", "created_at"),  # the scheduler's claim
        Index("ix_jobs_fingerprint", "fingerprint", "status"),  # coalescing onto a running identical job
    )


class TeamQueued(Base):
    """A team's queued jobs, counted as they move (storage.jobs): the quota sums a team's rows, never counts its jobs.

    Counting a team's queued jobs read every one of their rows (1.5-2.5 ms of
    PostgreSQL at 8,000). Each writer adds its +1/-1 to the row of its database
    backend's slot (``pg_backend_pid() % jobs.QUEUED_SLOTS``; 0 on SQLite), so
    concurrent submits of one team do not all wait for one row's lock, which is
    held until the commit's WAL flush. A slot's value may be negative; a team's
    sum is its number of queued jobs.
    """

    __tablename__ = "team_queued"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    queued: Mapped[int] = mapped_column(Integer)


class JobRun(Base):
    """One claim of a job: who ran it from when to when (fair share reads these)."""

    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str] = mapped_column(String(40))
    claim: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(20))  # the status it left running for

    __table_args__ = (Index("ix_job_runs_team_ended", "team_id", "ended_at"),)


class Worker(Base):
    """A worker process that registered itself, with what it can do and what it runs now."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # the lease owner name it claims with
    hostname: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(40))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)  # GPU memory, or RAM for a CPU worker
    methods: Mapped[list[Any]] = mapped_column(JSON, default=list)
    formats: Mapped[list[Any]] = mapped_column(JSON, default=list)
    engine_version: Mapped[str] = mapped_column(String(40))
    current_job_id: Mapped[str | None] = mapped_column(String(40))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(20))  # status | stage | progress | log
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str | None] = mapped_column(String(20))
    stage: Mapped[str | None] = mapped_column(String(20))
    message: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str | None] = mapped_column(String(40))  # the id of the API key that acted, never the key

    job: Mapped[Job] = relationship(back_populates="events")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # model
    format: Mapped[str] = mapped_column(String(20))  # gptq | awq | bnb
    location: Mapped[str | None] = mapped_column(String(1000))
    store_prefix: Mapped[str | None] = mapped_column(String(500))  # storage.layout key prefix; None: legacy layout
    files: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [{path, size, sha256}]
    file_count: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    hub_url: Mapped[str | None] = mapped_column(String(1000))
    hub_commit: Mapped[str | None] = mapped_column(String(80))
    # Provenance: the source commit the job resolved (Hub sha, or S3 listing digest) and each source file's sha256.
    source_revision: Mapped[str | None] = mapped_column(String(80))
    source_files: Mapped[dict[str, str] | None] = mapped_column(JSON)
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)  # None: never reused (gate failed, opted out)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")

    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_artifacts_job_kind"),)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    job_attempt: Mapped[int] = mapped_column(Integer, default=1)  # a retried job notifies again when it ends again
    hook_index: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2000))
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | delivered | failed | disabled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    attempt_log: Mapped[list["WebhookAttempt"]] = relationship(order_by="WebhookAttempt.id", cascade="all, delete-orphan")

    __table_args__ = (UniqueConstraint("job_id", "job_attempt", "hook_index", "event_type", name="uq_webhook_delivery"),)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
