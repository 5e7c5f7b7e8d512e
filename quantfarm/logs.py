"""Process logging: plain text for people, or one JSON object a line for log pipelines.

Every line a job causes carries its ``job_id`` and ``attempt`` (set by
``job_context`` around the job's run; threads started inside take it along when
started through ``copy_context``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from datetime import datetime, timezone
from typing import Iterator

_job: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("quantfarm_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str, attempt: int) -> Iterator[None]:
    """Tag every log record made inside the block with ``job_id`` and ``attempt``."""
    token = _job.set((job_id, int(attempt)))
    try:
        yield
    finally:
        _job.reset(token)


class JobFilter(logging.Filter):
    """Copy the current job (if any) onto each record as ``job_id`` and ``attempt``."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _job.get()
        if current is not None and not hasattr(record, "job_id"):
            record.job_id, record.attempt = current
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, role, message, job_id/attempt when a job caused it."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self.role,
            "message": record.getMessage(),
        }
        if getattr(record, "job_id", None) is not None:
            out["job_id"], out["attempt"] = record.job_id, record.attempt
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(role: str, fmt: str = "text", level: int = logging.INFO) -> None:
    """Set up the root logger of a process in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.addFilter(JobFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
