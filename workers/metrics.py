"""A worker's own Prometheus metrics, served on ``QUANTFARM_METRICS_PORT`` when it is set.

Job workers report per-layer seconds, job run time, checkpoint bytes and what
they are (device, capacity); the service worker reports webhook attempt
outcomes. Prometheus sums them over the workers it scrapes.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=False)

LAYER_SECONDS = Histogram("quantfarm_layer_seconds", "Seconds to quantize one layer (resumed layers excluded).", ["method"],
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=REGISTRY)
JOB_SECONDS = Histogram("quantfarm_worker_job_seconds", "Seconds one attempt of a job ran on this worker, by how it ended.",
                        ["method", "status"], buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200), registry=REGISTRY)
CHECKPOINT_BYTES = Counter("quantfarm_checkpoint_bytes", "Bytes of layer checkpoints written to the store.", registry=REGISTRY)
WORKERS = Gauge("quantfarm_workers", "This worker, by device and how many jobs it runs at once.", ["role", "device", "capacity"],
                registry=REGISTRY)
WEBHOOK_ATTEMPTS = Counter("quantfarm_webhook_attempts", "Webhook delivery attempts by outcome.", ["outcome"], registry=REGISTRY)

WEBHOOK_OUTCOMES = ("delivered", "pending", "failed", "disabled", "missing", "error")


def serve(port: int, role: str, device: str, capacity: int) -> None:
    """Start the metrics endpoint on ``port`` (a daemon thread) and say what this worker is."""
    WORKERS.labels(role, device, str(capacity)).set(1)
    start_http_server(port, registry=REGISTRY)
