"""Broker settings and task dispatch by name, shared by the API and the workers.

The API enqueues with ``send_task`` by name, so it never imports the workers.
"""

from __future__ import annotations

from typing import Any

from quantfarm.settings import Settings

RUN_JOB = "quantfarm.run_job"
SWEEP = "quantfarm.sweep"
DELIVER_WEBHOOK = "quantfarm.deliver_webhook"
GC = "quantfarm.gc"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings: the DB holds all state, so ack late, prefetch one, keep no results."""
    url = settings.resolved_broker_url
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": settings.queue,
        "task_routes": {
            RUN_JOB: {"queue": settings.queue},
            SWEEP: {"queue": settings.service_queue},
            DELIVER_WEBHOOK: {"queue": settings.service_queue},
            GC: {"queue": settings.service_queue},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        # No worker_max_tasks_per_child: job workers run the solo pool (the job runs in the
        # worker process itself, which the pool setting would not recycle); the engine frees
        # each layer and hands the heap back, so memory does not build up across jobs.
        "broker_transport_options": {},
    }
    if url.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    elif url.startswith(("redis", "rediss")):
        # Our leases and sweeper handle lost workers; keep Redis from redelivering running jobs.
        conf["broker_transport_options"] = {"visibility_timeout": 12 * 3600}
    return conf


class Dispatcher:
    """Sends tasks by name: jobs to the job queue, webhooks to the service queue."""

    def __init__(self, settings: Settings):
        from celery import Celery

        self.app = Celery("quantfarm-client")
        self.app.conf.update(celery_config(settings))

    def run_job(self, job_id: str) -> None:
        """Wake a worker (the id is a hint: the worker claims the best runnable job)."""
        self.app.send_task(RUN_JOB, args=[job_id])

    def deliver_webhook(self, delivery_id: str, countdown: float = 0) -> None:
        self.app.send_task(DELIVER_WEBHOOK, args=[delivery_id], countdown=countdown or None)

    def ping(self) -> bool:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return True
