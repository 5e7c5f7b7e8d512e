"""A real HTTP webhook receiver on loopback for the delivery tests.

It answers from a script of responses (status, delay, headers) and verifies
every request's signature with the ``standardwebhooks`` package from PyPI, the
reference implementation, not our own code.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    trickle: float = 0.0  # > 0: send the whole answer one byte per this many seconds


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    payload: Any
    error: str | None


class Receiver:
    """Threaded loopback server; use as a context manager, read ``received``."""

    def __init__(self, secret: str | None = None, script: list[Reply] | None = None):
        self.secret = secret
        self.script = list(script or [])
        self.received: list[Received] = []
        self.in_flight = 0  # requests being answered right now
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/quantfarm"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def _next(self) -> Reply:
        with self._lock:
            return self.script.pop(0) if self.script else Reply()

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[bool, Any, str | None]:
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        if self.secret is None:
            return False, None, "no secret configured"
        try:
            return True, Webhook(self.secret).verify(body, headers), None
        except WebhookVerificationError as exc:
            return False, None, str(exc)

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok, payload, err = receiver._verify(body, headers)
                with receiver._lock:
                    receiver.received.append(Received(self.path, headers, body, ok, payload, err))
                reply = receiver._next()
                with receiver._lock:
                    receiver.in_flight += 1
                try:
                    if reply.delay:
                        time.sleep(reply.delay)
                    if reply.trickle:
                        self._trickle(reply)
                        return
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:  # the client gave up (timeout test)
                    pass
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1

            def _trickle(self, reply: Reply) -> None:
                head = f"HTTP/1.1 {reply.status} OK\r\ncontent-length: {len(reply.body)}\r\n\r\n".encode()
                for i in range(len(head) + len(reply.body)):
                    self.wfile.write((head + reply.body)[i:i + 1])
                    self.wfile.flush()
                    time.sleep(reply.trickle)
                self.close_connection = True

            def log_message(self, *args):
                pass

        return Handler
