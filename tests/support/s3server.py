"""A real S3 endpoint for tests: ``moto_server`` as a subprocess, plus a fault-injecting proxy.

``MotoServer`` runs moto's HTTP server (from ``moto[server]`` in the venv) on a
free loopback port; boto3 talks to it over real HTTP, with no in-process
patching. ``FaultProxy`` is a small threaded HTTP proxy in front of it that can
answer the next N requests with a 5xx, stall them past the client's read
timeout, slow every request down, drop connections (the request read, never
forwarded, no answer), or be stopped and restarted on the same port to play an
endpoint that is down. It counts the writes that completed upstream per key
(PutObject, CompleteMultipartUpload), so a test can prove nothing went up twice.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def s3_settings_for(tmp_path: Path, endpoint: str, **overrides):
    """Farm settings for a fresh, uniquely named bucket at ``endpoint`` with 5 MiB multipart parts."""
    from quantfarm.settings import Settings

    mib = 1024 * 1024
    base = dict(
        home=tmp_path / "home", store="s3", s3_endpoint_url=endpoint, s3_bucket=f"qf-{uuid.uuid4().hex[:10]}",
        s3_access_key_id="testing", s3_secret_access_key="testing", s3_max_attempts=3,
        s3_connect_timeout=2.0, s3_read_timeout=2.0, s3_multipart_threshold=5 * mib, s3_multipart_chunksize=5 * mib,
    )
    return Settings(**{**base, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something answers HTTP on ``port``; raise RuntimeError if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout}s")


class MotoServer:
    """``moto_server -p PORT -H 127.0.0.1`` as a real subprocess."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(exe), "-p", str(self.port), "-H", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` that injects faults on demand."""

    def __init__(self, upstream_port: int, port: int | None = None):
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.requests = 0  # requests seen (forwarded or faulted)
        self.authorizations: list[str | None] = []  # each request's Authorization header (None: unsigned)
        self.faulted = 0
        self._lock = threading.Lock()
        self._fail: list[int] = []
        self._stall = 0
        self._stall_seconds = 0.0
        self._conns: set[socket.socket] = set()
        self._delay = 0.0
        self._drop_every = 0
        self._drop_only: tuple[str, ...] = ()
        self.dropped = 0
        self._seen_for_drop = 0
        self.completed: Counter[str] = Counter()  # "bucket/key" -> PutObject/CompleteMultipartUpload answered 2xx upstream
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` instead of forwarding them."""
        with self._lock:
            self._fail.extend([status] * n)

    def stall_next(self, n: int, seconds: float) -> None:
        """Hold the next ``n`` requests ``seconds`` before answering 503 (past a read timeout)."""
        with self._lock:
            self._stall, self._stall_seconds = n, seconds

    def slow(self, seconds: float) -> None:
        """Hold every request ``seconds`` before forwarding it (0: full speed again)."""
        with self._lock:
            self._delay = seconds

    def flap(self, every: int, methods: tuple[str, ...] = ()) -> None:
        """Drop the connection of every ``every``-th request (of ``methods`` only, when given) unanswered; 0 stops."""
        with self._lock:
            self._drop_every, self._drop_only, self._seen_for_drop = every, tuple(methods), 0

    def clear(self) -> None:
        """Forget faults not yet used."""
        with self._lock:
            self._fail, self._stall, self._delay, self._drop_every = [], 0, 0.0, 0

    def start(self) -> "FaultProxy":
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: clients now get 'connection refused'."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:  # kept-alive connections would otherwise go on being served
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _fault(self, method: str) -> tuple[str, float] | tuple[str, int] | None:
        with self._lock:
            self.requests += 1
            if self._drop_every and (not self._drop_only or method in self._drop_only):
                self._seen_for_drop += 1
                if self._seen_for_drop % self._drop_every == 0:
                    self.dropped += 1
                    self.faulted += 1
                    return ("drop", 0)
            if self._stall:
                self._stall -= 1
                self.faulted += 1
                return ("stall", self._stall_seconds)
            if self._fail:
                self.faulted += 1
                return ("fail", self._fail.pop(0))
        return None

    def _note_write(self, method: str, path: str) -> None:
        url = urlsplit(path)
        query = parse_qs(url.query, keep_blank_values=True)
        if (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId" in query):
            with self._lock:
                self.completed[unquote(url.path).lstrip("/")] += 1

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._conns.add(self.connection)

            def finish(self):
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the blank line
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.authorizations.append(self.headers.get("authorization"))
                fault = proxy._fault(self.command)
                if fault and fault[0] == "drop":  # a flapping link: the request is lost, the client hears nothing
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy._delay:
                    time.sleep(proxy._delay)
                if fault and fault[0] == "stall":
                    time.sleep(fault[1])
                    fault = ("fail", 503)
                if fault:
                    xml = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.close_connection = True
                    return self._answer(fault[1], [("Content-Type", "application/xml"), ("Connection", "close")], xml)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection", "keep-alive")}
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                if self.command != "HEAD":
                    out = [(k, v) for k, v in out if k.lower() != "content-length"] + [("Content-Length", str(len(data)))]
                conn.close()
                if 200 <= resp.status < 300:
                    proxy._note_write(self.command, self.path)
                self._answer(resp.status, out, data)

            def _safe(self) -> None:
                try:
                    self._proxy()
                except OSError:  # the client gave up (stall tests) or the proxy is stopping
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

            def log_message(self, *args):
                pass

        return Handler
