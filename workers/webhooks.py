"""Send one webhook attempt, signed per the Standard Webhooks spec, and decide what next.

``WebhookSender.deliver`` is what the thin Celery task calls: it makes at most
one HTTP request and returns a ``DeliveryOutcome`` saying whether (and in how
many seconds) to try again. Only a 2xx counts as delivered; 410 disables the
delivery; everything else is retried with exponential backoff and full jitter,
never sooner than the receiver's ``Retry-After``. Secrets never reach a log.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable
from urllib.parse import urlsplit

import requests

from quantfarm.netguard import AddressRefused, URLRefused, check_webhook_url, guarded_session, watch_sockets
from quantfarm.settings import Settings
from quantfarm.spec import secret_key
from storage import webhooks as store
from storage.db import Database
from storage.models import WebhookDelivery

log = logging.getLogger(__name__)

USER_AGENT = "quantfarm-webhooks/1"
_BODY_EXCERPT = 200


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` signature."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Return a full-jitter delay after attempt number ``attempt`` (1-based)."""
    ceiling = min(cap, base * (2 ** max(attempt - 1, 0)))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for (delta seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


def redact_url(url: str) -> str:
    """Return ``url`` without user info or query, for logs."""
    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{p.port}" if p.port else ""
    return f"{p.scheme}://{host}{port}{p.path}"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one ``deliver`` call did and whether the task must run again.

    ``status`` is the delivery's state afterwards: pending, delivered, failed,
    disabled, or missing (no such delivery). ``sent`` says whether a request
    went out in this call; ``retry_in`` is the countdown for the next attempt
    when ``retry`` is true.
    """

    delivery_id: str
    status: str
    sent: bool
    attempt: int | None = None
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    retry_in: float | None = None

    @property
    def retry(self) -> bool:
        return self.retry_in is not None


@dataclass(frozen=True)
class _Result:
    status_code: int | None
    latency_ms: float
    error: str | None
    retry_after: str | None = None
    refused: bool = False


class WebhookSender:
    """Delivers webhook attempts recorded in the database."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        http: requests.Session | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] | None = None,
        resolver: Callable[..., list] = socket.getaddrinfo,
    ):
        self.db = db
        self.settings = settings
        self.resolver = resolver
        self.http = http or guarded_session(settings.webhook_allow_private, resolver=resolver)
        self.rng = rng or random.Random()
        self.clock = clock or (lambda: datetime.now(timezone.utc))

    def deliver(self, delivery_id: str, *, force: bool = False) -> DeliveryOutcome:
        """Make at most one attempt of ``delivery_id`` and record it.

        Sends nothing for a delivery that is delivered, failed, disabled, not yet
        due (unless ``force``), or claimed by another worker; those outcomes never
        ask for a retry, so a duplicate task message dies out.
        """
        now = self.clock()
        with self.db.session() as s:
            delivery = s.get(WebhookDelivery, delivery_id)
            if delivery is None:
                log.warning("webhook delivery %s: not found; nothing to send", delivery_id)
                return DeliveryOutcome(delivery_id, "missing", sent=False)
            claim = store.claim_attempt(s, delivery, now, force=force)
            if claim is None:
                log.info("webhook delivery %s: %s, not due or taken; nothing sent", delivery_id, delivery.status)
                return DeliveryOutcome(delivery_id, delivery.status, sent=False, attempt=delivery.attempts,
                                       status_code=delivery.last_status_code, next_attempt_at=delivery.next_attempt_at)
        result = self._send(claim, now)
        status, next_at = self._decide(claim.attempt, result, now)
        with self.db.session() as s:
            store.record_attempt(
                s, delivery_id, status=status, at=now, status_code=result.status_code,
                latency_ms=round(result.latency_ms, 3), error=result.error, next_attempt_at=next_at,
            )
        log.info(
            "webhook delivery %s attempt %d to %s: %s -> %s%s", delivery_id, claim.attempt, redact_url(claim.url),
            result.status_code if result.status_code is not None else result.error, status,
            f" (next attempt at {next_at.isoformat()})" if next_at else "",
        )
        retry_in = max(0.0, (next_at - now).total_seconds()) if next_at is not None else None
        return DeliveryOutcome(delivery_id, status, sent=not result.refused,
                               attempt=claim.attempt, status_code=result.status_code, error=result.error,
                               next_attempt_at=next_at, retry_in=retry_in)

    # --- one HTTP request ---------------------------------------------------------------

    def _headers(self, claim: store.Claim, now: datetime) -> dict[str, str]:
        ts = int(now.timestamp())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": claim.delivery_id,
            "webhook-timestamp": str(ts),
            "connection": "close",  # one connection per attempt: the deadline watchdog cuts only its own
        }
        if claim.secret:
            headers["webhook-signature"] = sign(claim.secret, claim.delivery_id, ts, claim.payload)
        return headers

    def _send(self, claim: store.Claim, now: datetime) -> _Result:
        try:
            check_webhook_url(claim.url, self.settings.webhook_allow_private, "url", resolver=self.resolver)
            headers = self._headers(claim, now)
        except URLRefused as exc:
            return _Result(None, 0.0, f"refused: {exc.reason}", refused=not exc.transient)
        except ValueError as exc:  # a secret that cannot sign: retrying cannot help
            return _Result(None, 0.0, f"cannot sign: {exc}", refused=True)
        deadline = self.settings.webhook_timeout
        started = time.perf_counter()
        elapsed = lambda: (time.perf_counter() - started) * 1000  # noqa: E731
        # requests' timeout bounds each socket read, so a receiver trickling a byte a second would hold
        # this thread for ever: a watchdog cuts the connection at the total deadline instead.
        with watch_sockets() as watch:
            watchdog = threading.Timer(deadline, watch.cut_all)
            watchdog.daemon = True
            watchdog.start()
            try:
                with self.http.post(claim.url, data=claim.payload, headers=headers, timeout=deadline,
                                    allow_redirects=False, stream=True) as resp:
                    excerpt = _excerpt(resp)
                    latency = elapsed()
            except AddressRefused as exc:
                return _Result(None, elapsed(), f"refused: {exc.refusal.reason}", refused=True)
            except requests.RequestException as exc:
                timed_out = watch.cut or isinstance(exc, requests.Timeout)
                return _Result(None, elapsed(), f"timed out after {deadline:g}s" if timed_out else f"connection failed ({type(exc).__name__})")
            finally:
                watchdog.cancel()
        error = None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}" + (f": {excerpt}" if excerpt else "")
        return _Result(resp.status_code, latency, error, resp.headers.get("retry-after"))

    def _decide(self, attempt: int, result: _Result, now: datetime) -> tuple[str, datetime | None]:
        code = result.status_code
        if code is not None and 200 <= code < 300:
            return store.DELIVERED, None
        if code == 410:
            return store.DISABLED, None
        if result.refused or attempt >= self.settings.webhook_max_attempts:
            return store.FAILED, None
        delay = backoff_delay(attempt, self.settings.webhook_backoff_base, self.settings.webhook_backoff_max, self.rng)
        asked = parse_retry_after(result.retry_after, now)
        if asked is not None:
            delay = max(delay, min(asked, self.settings.webhook_backoff_max))
        return store.PENDING, now + timedelta(seconds=delay)


def _excerpt(resp: requests.Response) -> str:
    # Read a little of the body for the log; a receiver may answer with megabytes.
    try:
        raw = resp.raw.read(_BODY_EXCERPT, decode_content=True) or b""
    except Exception:
        return ""
    text = raw.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()
