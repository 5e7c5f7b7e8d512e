"""One error hierarchy for the whole farm.

Every error a user can see derives from ``QuantfarmError`` and carries a stable
snake_case ``code``, a sentence a person can act on, and optional ``details``.
The API turns them into ``{"error", "message", "details"}`` bodies; the worker
turns them into a ``failed`` job with the same code and message.
"""

from __future__ import annotations

from typing import Any


class QuantfarmError(Exception):
    """Base of every error the farm reports to a user."""

    code = "internal_error"
    http_status = 500
    retryable = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "details": self.details}


# --- request errors (API) -------------------------------------------------


class BadRequest(QuantfarmError):
    code = "bad_request"
    http_status = 400


class InvalidJSON(BadRequest):
    code = "invalid_json"


class ValidationFailed(QuantfarmError):
    """A request body broke the schema; ``details.fields`` maps each field to why."""

    code = "validation_error"
    http_status = 422

    def __init__(self, fields: dict[str, str], message: str | None = None):
        names = ", ".join(sorted(fields))
        super().__init__(message or f"The request has invalid fields: {names}.", details={"fields": fields})
        self.fields = fields


class NotFound(QuantfarmError):
    code = "not_found"
    http_status = 404


class TooLarge(QuantfarmError):
    """The job needs more memory than any worker on the farm has (HTTP 422, or a failed job)."""

    code = "too_large"
    http_status = 422


class InvalidState(QuantfarmError):
    """The job is in the wrong state for the action (HTTP 409)."""

    code = "invalid_state"
    http_status = 409


class Unauthorized(QuantfarmError):
    code = "unauthorized"
    http_status = 401


class Forbidden(QuantfarmError):
    code = "forbidden"
    http_status = 403


# --- job errors (worker) --------------------------------------------------


class JobError(QuantfarmError):
    """A job cannot finish; the job is marked failed with this code."""

    code = "job_failed"
    http_status = 400


class ModelNotFound(JobError):
    code = "model_not_found"


class NotAModel(JobError):
    code = "not_a_model"


class UnsupportedArchitecture(JobError):
    code = "unsupported_architecture"


class UnsupportedModel(JobError):
    code = "unsupported_model"


class CalibrationError(JobError):
    code = "calibration_error"


class CheckpointMismatch(JobError):
    code = "checkpoint_mismatch"


class DependencyMissing(JobError):
    code = "dependency_missing"


class StorageUnavailable(JobError):
    code = "storage_unavailable"
    http_status = 503
    retryable = True


class WorkerLost(JobError):
    code = "worker_lost"


class PublishError(JobError):
    code = "publish_failed"


# --- control flow (never shown as failures) -------------------------------


class JobCancelled(QuantfarmError):
    """Raised at a layer boundary when a cancel was requested."""

    code = "cancelled"


class LeaseLost(QuantfarmError):
    """Raised when another worker owns the job now; this worker must stop quietly."""

    code = "lease_lost"
