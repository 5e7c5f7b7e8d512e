"""``python -m workers [worker|service]``.

``worker`` runs quantization jobs, one at a time (one per GPU in production).
``service`` runs the sweeper on a beat schedule and delivers webhooks, on its own
queue, so neither waits behind an hours-long job.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> None:
    role = (argv if argv is not None else sys.argv[1:] or ["worker"])[0]
    if role == "worker":
        from workers.engine.heap import configure_heap

        configure_heap()  # before any other thread allocates: every thread in one arena, large blocks mmapped
    from quantfarm.settings import Settings
    from storage.artifacts import StoreNotReady
    from workers.celery_app import configure
    from workers.context import init_context

    settings = Settings()
    from quantfarm.logs import configure as configure_logging

    configure_logging(role, settings.log_format)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        ctx = init_context(settings)  # makes the farm's bucket before any job can read from it
    except StoreNotReady as exc:
        logging.getLogger("quantfarm").error("%s", exc)
        raise SystemExit(f"quantfarm {role}: {exc}") from None
    app = configure(settings)
    if settings.metrics_port:
        from workers import metrics
        from workers.engine.model import resolve_device

        capacity = 1 if role == "worker" else 0  # jobs at once: the solo pool runs one
        metrics.serve(settings.metrics_port, role, str(resolve_device(settings.device)), capacity)
    common = ["--without-gossip", "--without-mingle", "--loglevel=INFO"]
    if role == "worker":
        from workers.poller import Poller
        from workers.presence import Presence

        presence = Presence(ctx.db, ctx.runner, settings.worker_beat_seconds).start()  # the farm sees us from now
        poller = Poller(ctx.runner, settings.worker_poll_seconds).start()  # looks for work at once, then every interval
        try:
            app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--queues={settings.queue}", *common])
        finally:
            poller.stop()  # a job running on the poller's thread hands itself back first
            presence.stop()
    elif role == "service":
        settings.home.mkdir(parents=True, exist_ok=True)
        app.worker_main([
            "worker", "--pool=threads", "--concurrency=4", f"--queues={settings.service_queue}",
            "--beat", f"--schedule={settings.home.resolve() / 'celerybeat-schedule'}", *common,
        ])
    else:
        raise SystemExit(f"unknown role {role!r}; use 'worker' or 'service'")


if __name__ == "__main__":
    main()
