"""The hottest requests answered before Flask: ``GET /healthz``, ``GET /v1/jobs/<id>`` and ``GET /v1/jobs``.

Load balancers poll /healthz and clients poll their jobs. Flask's request
context, routing and hooks were about a third of such a request's CPU, so
``FastPath``, a WSGI middleware around the app's own, answers the plain case of
each with the code the views run (the health memo, ``auth.cached_principal``,
``job_service.read_job``, ``jobs.jobs_page``) and Flask's own response making
(``app.make_response``, then ``auth.security_headers``): the same bytes, status
and headers as the view. It counts each request it answers in the HTTP metrics
under the route's template, as the Flask hook would.

Everything else goes to Flask untouched, which answers it, so every error
response is made in one place: another method, an untrusted Host, a cookie (page
sessions), no key or one this process has not verified within its cache TTL, a
key whose last use is due to be recorded, a query other than the list's plain
``status``/``limit``/``cursor``, a job not found, any error at all.
"""

from __future__ import annotations

import re
import time

from flask import Flask
from werkzeug.exceptions import SecurityError
from werkzeug.wsgi import get_host

from api import auth, job_service, service
from api.jobs import jobs_page

_JOB_PATH = re.compile(r"/v1/jobs/(job_[0-9a-z]{26})")
# Plain name=value pairs only: nothing to percent-decode, so the parsed values are the ones Flask's request.args holds.
_PLAIN_QUERY = re.compile(r"[a-z]+=[0-9A-Za-z_]*(?:&[a-z]+=[0-9A-Za-z_]*)*")
_LIST_PARAMS = frozenset({"status", "limit", "cursor"})


class FastPath:
    """WSGI middleware: the plain GETs of /healthz, one job and a page of jobs, without Flask's request handling."""

    def __init__(self, app: Flask, wsgi_app):
        self.app, self.wsgi_app = app, wsgi_app
        rules = {rule.endpoint: rule.rule for rule in app.url_map.iter_rules()}
        # The metrics' route labels, as Flask's hook reads them from the matched rule.
        self.health_route, self.job_route, self.list_route = (
            rules["service.healthz"], rules["jobs.get_job"], rules["jobs.list_jobs"])
        self._health: tuple | None = None  # (memo answer, its encoded answer): encoded once per check
        self._hosts: dict[tuple, tuple[list, bool]] = {}  # (what get_host reads) -> (the allowlist, trusted?)

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "GET":
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                handler = self._healthz
            elif path == "/v1/jobs":
                handler = self._jobs_page
            elif path.startswith("/v1/jobs/"):
                handler = self._job
            else:
                handler = None
            if handler is not None and self._trusted_host(environ):
                started = time.perf_counter()
                try:
                    done = handler(environ)
                except Exception:  # whatever it was, Flask meets it again and answers it
                    done = None
                if done is not None:
                    route, code, status, headers, body = done
                    start_response(status, headers)
                    self.app.extensions["quantfarm_metrics"].observe(route, "GET", code, time.perf_counter() - started)
                    return [body]
        return self.wsgi_app(environ, start_response)

    def _db(self):
        return self.app.extensions["quantfarm"].db

    def _trusted_host(self, environ) -> bool:
        trusted = self.app.config.get("TRUSTED_HOSTS")
        if trusted is None:
            return True
        # What werkzeug's get_host reads; the answer for each is kept (a client sends the same Host every time).
        seen = (environ.get("HTTP_HOST"), environ.get("SERVER_NAME"), environ.get("SERVER_PORT"), environ.get("wsgi.url_scheme"))
        known = self._hosts.get(seen)
        if known is not None and known[0] is trusted:
            return known[1]
        try:
            get_host(environ, trusted)
            ok = True
        except SecurityError:
            ok = False  # Flask answers its 400
        if len(self._hosts) >= 64:  # made-up Host headers must not grow it
            self._hosts.clear()
        self._hosts[seen] = (trusted, ok)
        return ok

    def _respond(self, route: str, rv) -> tuple[str, int, str, list[tuple[str, str]], bytes]:
        resp = auth.security_headers(self.app.make_response(rv))
        return route, resp.status_code, resp.status, resp.headers.to_wsgi_list(), resp.get_data()

    def _ok(self, route: str, obj: dict) -> tuple[str, int, str, list[tuple[str, str]], bytes]:
        """``_respond`` for a view's dict (a 200), without building the Response: the same body, status and headers.

        Flask's JSON response is the compact text, UTF-8, with Content-Type then
        Content-Length; ``auth.security_headers`` appends the three a JSON response
        never sets itself. Building the Response object was about a fifth of a GET.
        """
        text = self.app.json.compact_text(obj)
        if text is None:  # indented (debug)
            return self._respond(route, obj)
        body = text.encode()
        return route, 200, "200 OK", [("Content-Type", self.app.json.mimetype), ("Content-Length", str(len(body))),
                                      *auth.SECURITY_HEADERS], body

    def _healthz(self, environ):
        if environ.get("QUERY_STRING"):
            return None
        answer = service.health_answer(self.app)
        encoded = self._health
        if encoded is None or encoded[0] is not answer:  # encoded once per check
            body, status = answer
            encoded = self._health = (answer, self._respond(self.health_route, (body, status, service.health_headers(status))))
        return encoded[1]

    def _caller(self, environ) -> auth.Principal | None:
        """The caller of a request with a verified key (in this process's cache) and nothing else to look at."""
        header = environ.get("HTTP_AUTHORIZATION")
        if header is None or "HTTP_COOKIE" in environ:
            return None
        return auth.cached_principal(self.app.extensions["quantfarm_keys"], auth.bearer_key(header))

    def _job(self, environ):
        match = _JOB_PATH.fullmatch(environ["PATH_INFO"])
        who = self._caller(environ) if match is not None and not environ.get("QUERY_STRING") else None
        if who is None:
            return None
        return self._ok(self.job_route, job_service.read_job(self._db(), who, match[1]))

    def _jobs_page(self, environ):
        query = environ.get("QUERY_STRING", "")
        if query and not _PLAIN_QUERY.fullmatch(query):
            return None
        args = dict(pair.split("=", 1) for pair in query.split("&")) if query else {}
        if not args.keys() <= _LIST_PARAMS or (query and len(args) != query.count("&") + 1):
            return None  # another parameter, or one given twice
        who = self._caller(environ)
        if who is None:
            return None
        return self._ok(self.list_route, jobs_page(self._db(), who, args, int(self.app.config["JOBS_PAGE_MAX"])))


def install(app: Flask) -> None:
    """Put ``FastPath`` in front of the app's WSGI callable (after every blueprint is registered: it reads their rules)."""
    app.wsgi_app = FastPath(app, app.wsgi_app)
