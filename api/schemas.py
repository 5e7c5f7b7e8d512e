"""Response models of the API, used to generate the OpenAPI document (and checked by the tests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.jobs import JobStatus, Stage
from storage.teams import CREDENTIAL_KINDS, ROLES

JobStatusName = Literal[tuple(s.value for s in JobStatus)]  # type: ignore[valid-type]
StageName = Literal[tuple(s.value for s in Stage)]  # type: ignore[valid-type]
RoleName = Literal[ROLES]  # type: ignore[valid-type]


class Out(BaseModel):
    # Forbid extras so a field added to a view without documenting it fails the tests.
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Out):
    error: str = Field(description="snake_case error code, stable across releases")
    message: str = Field(description="One sentence a person can act on")
    details: dict[str, Any] = Field(description="For 422: {'fields': {'dotted.field': 'why'}}")


class Progress(Out):
    layers_done: int
    layers_total: int
    fraction: float
    eta_seconds: float | None


class JobErrorOut(Out):
    code: str
    message: str | None


class ArtifactOut(Out):
    id: str
    job_id: str
    kind: str = Field(description="model for the job's first format; the format's name for each further one")
    format: str = Field(description="The output format: gptq | awq | bitsandbytes | compressed-tensors | ...")
    files: int = Field(description="Number of files")
    size_bytes: int
    sha256: str = Field(description="Digest over the artifact's file list")
    location: str | None = Field(description="Where the files are in the farm's store, if stored there")
    hub_url: str | None
    hub_commit: str | None
    source_revision: str | None = Field(description="The source's resolved commit (Hub sha or S3 listing digest); null for local sources")
    source_files: dict[str, str] | None = Field(description="sha256 of each source weight shard and config.json the job quantized")
    created_at: datetime | None


class JobOut(Out):
    id: str
    team_id: str = Field(description="The team the job belongs to")
    created_by: str | None = Field(description="Id of the API key that submitted it; null for the local admin")
    status: JobStatusName
    stage: StageName | None
    method: str
    model: str = Field(description="Readable model reference: hub:org/name@rev, s3://..., local:/path, upload:id")
    progress: Progress | None
    attempt: int
    memory_estimate_bytes: int | None = Field(description="Estimated peak memory (from config.json); null until known")
    reused_from: str | None = Field(description="Id of the team's own job whose identical result this one reused; "
                                                "\"another_team\" when it came from another team's job; null: computed here")
    cancel_requested: bool
    spec: dict[str, Any] = Field(description="The submitted job spec with secrets removed")
    error: JobErrorOut | None
    metrics: dict[str, Any]
    artifacts: list[ArtifactOut]
    labels: dict[str, str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None


class JobPage(Out):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class EventOut(Out):
    id: int
    at: datetime
    kind: Literal["status", "stage", "progress", "log"]
    from_status: str | None
    to_status: str | None
    stage: str | None
    message: str | None
    data: dict[str, Any]


class EventList(Out):
    items: list[EventOut]


class ArtifactList(Out):
    items: list[ArtifactOut]


class FileOut(Out):
    path: str
    size: int
    sha256: str
    url: str = Field(description="Download URL, relative to the API root")


class FileList(Out):
    artifact_id: str
    items: list[FileOut]


class UploadOut(Out):
    id: str
    team_id: str
    filename: str
    size_bytes: int
    sha256: str
    created_at: datetime


class DeliveryAttemptOut(Out):
    at: datetime | None
    status_code: int | None
    latency_ms: float | None
    error: str | None
    next_attempt_at: datetime | None


class DeliveryOut(Out):
    id: str
    job_id: str
    url: str
    event_type: str
    status: Literal["pending", "delivered", "failed", "disabled"]
    attempts: int
    last_status_code: int | None
    next_attempt_at: datetime | None
    created_at: datetime | None
    delivered_at: datetime | None
    log: list[DeliveryAttemptOut]


class DeliveryList(Out):
    items: list[DeliveryOut]


class Health(Out):
    status: Literal["ok", "unavailable"]
    db: Literal["ok", "down"]
    broker: Literal["ok", "down"]
    details: dict[str, str] = Field(default_factory=dict, description="Why each part is down")


class MeOut(Out):
    key_id: str | None
    team_id: str
    team: str | None
    role: RoleName
    local_admin: bool = Field(description="True when no key was needed (QUANTFARM_AUTH=auto on loopback with no keys, or off)")


class WorkerJobOut(Out):
    id: str
    team_id: str
    team: str | None
    method: str


class WorkerOut(Out):
    id: str
    hostname: str
    device: str
    memory_bytes: int = Field(description="GPU memory, or RAM for a CPU worker")
    methods: list[str]
    formats: list[str]
    engine_version: str
    started_at: datetime | None
    last_seen_at: datetime | None
    job: WorkerJobOut | None


class FarmMemory(Out):
    largest: int | None
    total: int


class FarmOut(Out):
    workers: int = Field(description="Workers seen within 3 beats")
    busy: int
    idle: int
    utilization: float = Field(description="busy / workers")
    queue_depth: int
    running: int
    memory_bytes: FarmMemory
    devices: dict[str, int]
    items: list[WorkerOut] | None = Field(None, description="Admins only: each worker and the job (and team) it runs")


class TeamOut(Out):
    id: str
    name: str
    max_queued: int | None = Field(description="Queued-job quota; null: the farm's QUANTFARM_TEAM_MAX_QUEUED")
    max_running: int | None = Field(description="Running-job limit the scheduler enforces; null: none")
    created_at: datetime | None


class TeamList(Out):
    items: list[TeamOut]


class KeyOut(Out):
    id: str
    team_id: str
    team: str | None
    name: str
    role: RoleName
    created_at: datetime | None
    created_by: str | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    revoked: bool


class KeyCreated(KeyOut):
    key: str = Field(description="The API key. Shown this once: only its hash is stored")


class KeyList(Out):
    items: list[KeyOut]


class CredentialOut(Out):
    id: str
    team_id: str
    name: str
    kind: Literal[CREDENTIAL_KINDS]  # type: ignore[valid-type]
    created_at: datetime | None
    updated_at: datetime | None
    created_by: str | None


class CredentialList(Out):
    items: list[CredentialOut]


RESPONSE_MODELS: tuple[type[Out], ...] = (
    ErrorBody, JobOut, JobPage, EventList, ArtifactList, ArtifactOut, FileList, UploadOut, DeliveryList, DeliveryOut, Health,
    MeOut, FarmOut, TeamOut, TeamList, KeyOut, KeyCreated, KeyList, CredentialOut, CredentialList,
)
