"""The Celery app. Tasks are thin; all state lives in our database."""

from __future__ import annotations

from celery import Celery

from quantfarm.queue import GC, SWEEP, celery_config
from quantfarm.settings import Settings

app = Celery("quantfarm", include=["workers.tasks"])


def configure(settings: Settings) -> Celery:
    """Apply the settings to the app (called once when a worker or beat starts)."""
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = {
        "sweep": {"task": SWEEP, "schedule": settings.sweep_seconds},
        "gc": {"task": GC, "schedule": settings.gc_every_seconds},
    }
    return app
