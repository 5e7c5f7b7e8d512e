"""``python -m workers``: start one Celery worker (one job at a time)."""

from __future__ import annotations

import logging
import os


def main() -> None:
    from quantfarm.settings import Settings
    from workers.celery_app import configure
    from workers.context import init_context

    settings = Settings()
    if settings.torch_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s %(message)s")
    init_context(settings)
    app = configure(settings)
    app.worker_main([
        "worker", "--pool=solo", "--concurrency=1", f"--queues={settings.queue}",
        "--without-gossip", "--without-mingle", "--loglevel=INFO",
    ])


if __name__ == "__main__":
    main()
