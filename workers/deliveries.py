"""Webhook deliveries on threads of their own, so slow receivers never hold up sweeps.

The service worker's task threads are few and shared with the sweeper: a
delivery task only hands its delivery to this pool and returns. A full pool
puts the delivery back on the broker a few seconds later; a delivery lost with
the process (queued here, not yet sent) is still pending in the database, and
the sweeper re-sends it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from quantfarm.settings import Settings
from storage.db import Database

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 5.0


class DeliveryPool:
    """Up to ``settings.webhook_threads`` attempts at once, and a backlog of four times that."""

    def __init__(self, settings: Settings, db: Database, dispatcher):
        self.settings, self.db, self.dispatcher = settings, db, dispatcher
        self.threads = settings.webhook_threads
        self.backlog = 4 * self.threads
        self._pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="webhook")

    def submit(self, delivery_id: str) -> bool:
        """Queue one attempt of ``delivery_id``; False (and re-sent later via the broker) when full."""
        with self._lock:
            full = self._pending >= self.backlog
            if not full:
                self._pending += 1
        if full:
            log.warning("webhook delivery %s: all %d delivery threads busy; retrying in %gs", delivery_id, self.threads, BUSY_RETRY_SECONDS)
            self.dispatcher.deliver_webhook(delivery_id, countdown=BUSY_RETRY_SECONDS)
            return False
        self._pool.submit(self._deliver, delivery_id)
        return True

    def _deliver(self, delivery_id: str) -> None:
        from workers.webhooks import WebhookSender

        from workers.metrics import WEBHOOK_ATTEMPTS

        try:
            outcome = WebhookSender(self.db, self.settings).deliver(delivery_id)
            if outcome.sent:
                WEBHOOK_ATTEMPTS.labels(outcome.status).inc()
            if outcome.retry:
                self.dispatcher.deliver_webhook(delivery_id, countdown=outcome.retry_in)
        except Exception:  # the delivery stays pending in the database; the sweeper re-sends it
            WEBHOOK_ATTEMPTS.labels("error").inc()
            log.exception("webhook delivery %s: attempt failed", delivery_id)
        finally:
            with self._lock:
                self._pending -= 1

    def shutdown(self) -> None:
        """Stop taking work; drop what is queued here (the sweeper re-sends it) and let running attempts end."""
        self._pool.shutdown(wait=False, cancel_futures=True)
