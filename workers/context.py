"""The objects a worker process builds once at start-up and its tasks share."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from quantfarm.queue import Dispatcher
from quantfarm.settings import Settings
from quantfarm.store import BlobStore
from storage.artifacts import make_store
from storage.db import Database

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    store: BlobStore
    dispatcher: Dispatcher

    @functools.cached_property
    def runner(self):
        from workers.runner import JobRunner

        return JobRunner(self.settings, self.db, self.store, wake=self.dispatcher.run_job)

    @functools.cached_property
    def deliveries(self):
        from workers.deliveries import DeliveryPool

        return DeliveryPool(self.settings, self.db, self.dispatcher)

    @functools.cached_property
    def sweeper(self):
        from workers.sweeper import Sweeper

        return Sweeper(self.settings, self.db, self.dispatcher)


_context: WorkerContext | None = None


def init_context(settings: Settings) -> WorkerContext:
    """Build the process's context once (a worker, beat or the embedded sweeper)."""
    global _context
    db = Database.from_settings(settings, retry_seconds=settings.db_retry_seconds)
    dispatcher = Dispatcher(settings)
    db.notify_webhook = dispatcher.deliver_webhook
    _context = WorkerContext(settings, db, make_store(settings), dispatcher)
    return _context


def context_if_built() -> WorkerContext | None:
    return _context


def context() -> WorkerContext:
    if _context is None:  # a worker started by plain `celery -A workers.celery_app worker`
        return init_context(Settings())
    return _context
