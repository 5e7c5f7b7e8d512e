"""The hottest requests answered before Flask: ``GET /healthz``, ``GET /v1/jobs/<id>``, ``GET /v1/jobs``, ``POST /v1/jobs``.

Load balancers poll /healthz, clients poll their jobs and submit them. Flask's
request context, routing and hooks were about a third of such a request's CPU,
so ``FastPath``, a WSGI middleware around the app's own, answers the plain case
of each with the code the views run (the health memo, ``auth.cached_principal``,
``job_service.read_job_rows`` and ``read_page_rows`` (on PostgreSQL, with the rows
kept until each job's change notice: storage/job_cache.py), ``job_service.check_submit``
and ``create``) and writes Flask's own response: the same bytes, status and headers
as the view. It counts each request it answers in the HTTP metrics under the
route's template, as the Flask hook would.

Everything else goes to Flask untouched, which answers it, so every error
response is made in one place: another method, an untrusted Host, a cookie (page
sessions), no key (but with auth off: the local admin) or one this process has not verified within its cache TTL, a
key whose last use is due to be recorded, a query other than the list's plain
``status``/``limit``/``cursor``, a job not found, a browser's cross-site headers
on a submit, a Hub or S3 model (its submit reads over the network), any error
at all. A submit's error is Flask's to answer too: before the job is stored,
Flask checks again; at or after the commit, the view raises the very error the
fast path met (``jobs.SUBMIT_FAILED``), so a job is never submitted twice.
"""

from __future__ import annotations

import io
import math
import re
import time

from flask import Flask, g
from werkzeug.exceptions import SecurityError
from werkzeug.wsgi import get_host

from api import auth, job_service, service
from api.errors import json_object
from api.jobs import SUBMIT_FAILED, created_headers, jobs_page, page_query
from api.submits import SubmitBatches
from quantfarm.spec import parse_spec
from storage.job_reads import JOB_COLUMNS, view_of

_JOB_PATH = re.compile(r"/v1/jobs/(job_[0-9a-z]{26})")
# Plain name=value pairs only: nothing to percent-decode, so the parsed values are the ones Flask's request.args holds.
_PLAIN_QUERY = re.compile(r"[a-z]+=[0-9A-Za-z_]*(?:&[a-z]+=[0-9A-Za-z_]*)*")
_LIST_PARAMS = frozenset({"status", "limit", "cursor"})
_STATUS = {200: "200 OK", 201: "201 CREATED"}  # werkzeug's status lines
_ETA = JOB_COLUMNS.index("eta_seconds")
# Set on a request answered for the keyless local admin: Flask looked for a session cookie to answer it, and says so.
_VARY_COOKIE = "quantfarm.vary_cookie"


class EncodedViews:
    """The encoded job views (a job's or a page item's) of the job rows read last, by those rows.

    A view is a function of its job's rows alone (storage.job_reads.view_of: every
    column it shows, json columns as their stored text), so rows equal to rows seen
    before make the same bytes: a job polled again, unchanged, is neither decoded nor
    built nor encoded again (about half of a page's CPU). Any change to what a view
    shows changes its rows. Bounded: emptied when full, in views or in their text (a
    job's spec can be a megabyte).
    """

    def __init__(self, make, size: int = 1024, max_chars: int = 32 * 1024 * 1024):
        self.make, self.size, self.max_chars = make, size, max_chars  # make(rows) -> the encoded view
        self._memo: dict[tuple, str] = {}
        self._chars = 0

    def __call__(self, rows: tuple[tuple, ...]) -> str:
        text = self._memo.get(rows)
        if text is None:
            text = self.make(rows)
            eta = rows[0][_ETA]
            # 0.0 and -0.0 are equal keys but encode apart; a NaN is never equal to itself: neither is kept.
            if eta is None or (eta != 0 and not math.isnan(eta)):
                if len(self._memo) >= self.size or self._chars + len(text) > self.max_chars:
                    self._memo.clear()
                    self._chars = 0
                self._memo[rows] = text
                self._chars += len(text)
        return text


class FastPath:
    """WSGI middleware: the plain GETs of /healthz, one job and a page of jobs, without Flask's request handling."""

    def __init__(self, app: Flask, wsgi_app):
        self.app, self.wsgi_app = app, wsgi_app
        rules = {rule.endpoint: rule.rule for rule in app.url_map.iter_rules()}
        # The metrics' route labels, as Flask's hook reads them from the matched rule.
        self.health_route, self.job_route, self.list_route, self.submit_route = (
            rules["service.healthz"], rules["jobs.get_job"], rules["jobs.list_jobs"], rules["jobs.create_job"])
        self._health: tuple | None = None  # (memo answer, its encoded answer): encoded once per check
        self._jobs = EncodedViews(lambda rows: self._encoded(view_of(rows)))
        self._items = EncodedViews(lambda rows: self._encoded(job_service.summary_view(view_of(rows))))
        self._hosts: dict[tuple, tuple[list, bool]] = {}  # (what get_host reads) -> (the allowlist, trusted?)
        db = app.extensions["quantfarm"].db
        # PostgreSQL: the submits that arrive together stored by one statement (api/submits.py).
        self.submits = SubmitBatches(db) if db.engine.dialect.name == "postgresql" else None

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")
        handler = None
        if method == "GET":
            if path == "/healthz":
                handler = self._healthz
            elif path == "/v1/jobs":
                handler = self._jobs_page
            elif path.startswith("/v1/jobs/"):
                handler = self._job
        elif method == "POST" and path == "/v1/jobs":
            handler = self._submit
        if handler is not None and self._trusted_host(environ):
            started = time.perf_counter()
            try:
                done = handler(environ)
            except Exception:  # whatever it was, Flask meets it again and answers it
                done = None
            if done is not None:
                route, code, status, headers, body = done
                if environ.get(_VARY_COOKIE):  # as Flask's session interface adds it, last
                    headers = [*headers, ("Vary", "Cookie")]
                start_response(status, headers)
                self.app.extensions["quantfarm_metrics"].observe(route, method, code, time.perf_counter() - started)
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

    def _ok(self, route: str, obj: dict, code: int = 200, headers: dict[str, str] | None = None):
        """``_respond`` for a view's dict (and its headers), without building the Response: the same body, status, headers.

        Flask's JSON response is the compact text, UTF-8, with Content-Type, then
        Content-Length, then the view's headers; ``auth.security_headers`` appends
        the three a JSON response never sets itself. Building the Response object
        was about a fifth of a GET.
        """
        text = self.app.json.compact_text(obj)
        if text is None:  # indented (debug)
            return self._respond(route, (obj, code, headers or {}))
        body = text.encode()
        return route, code, _STATUS[code], [("Content-Type", self.app.json.mimetype), ("Content-Length", str(len(body))),
                                            *(headers or {}).items(), *auth.SECURITY_HEADERS], body

    def _indented(self) -> bool:
        return self.app.json.compact_text(None) is None  # debug: the views' own answers (not kept)

    def _encoded(self, obj) -> str:
        return self.app.json.compact_text(obj)[:-1]  # without the newline that ends a response

    def _ok_text(self, route: str, text: str):
        """``_ok`` for a 200 whose compact body ``text`` is made already."""
        body = text.encode()
        return route, 200, _STATUS[200], [("Content-Type", self.app.json.mimetype), ("Content-Length", str(len(body))),
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
        """The caller of a request with a verified key (in this process's cache) and nothing else to look at; with
        ``QUANTFARM_AUTH=off`` (a loopback farm), a request with neither key nor cookie is the local admin, as
        ``auth.authenticate`` resolves it (``auto``'s answer needs the database: Flask's)."""
        if "HTTP_COOKIE" in environ:
            return None
        header = environ.get("HTTP_AUTHORIZATION")
        if header is None:
            if self.app.extensions["quantfarm"].settings.auth != "off":
                return None
            environ[_VARY_COOKIE] = True
            return auth.LOCAL_ADMIN
        return auth.cached_principal(self.app.extensions["quantfarm_keys"], auth.bearer_key(header))

    def _job(self, environ):
        match = _JOB_PATH.fullmatch(environ["PATH_INFO"])
        who = self._caller(environ) if match is not None and not environ.get("QUERY_STRING") else None
        if who is None:
            return None
        if self._indented():
            return self._ok(self.job_route, job_service.read_job(self._db(), who, match[1]))
        return self._ok_text(self.job_route, self._jobs(job_service.read_job_rows(self._db(), who, match[1])) + "\n")

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
        page_max = int(self.app.config["JOBS_PAGE_MAX"])
        if self._indented():
            return self._ok(self.list_route, jobs_page(self._db(), who, args, page_max))
        status, limit, cursor = page_query(args, page_max)
        jobs, nxt = job_service.read_page_rows(self._db(), who, status=status, limit=limit, cursor=cursor)
        # The page object's own compact text: {"items": [...], "next_cursor": ...}, its items as encoded.
        items = ",".join([self._items(rows) for rows in jobs])
        return self._ok_text(self.list_route, f'{{"items":[{items}],"next_cursor":{self._encoded(nxt)}}}\n')


    def _submit(self, environ):
        """POST /v1/jobs of a local or uploaded model: ``job_service.check_submit``, then ``create``, as the view runs them.

        The quota is checked as the job is stored, in the one statement that stores it
        (``create(..., within_quota=True)``; on PostgreSQL with the submits that arrive
        together, api/submits.py): no SELECT of its own. Any failure before the
        job is stored (a bad body, a check, the quota) goes to Flask, which checks again
        (the quota first, as always) and answers: nothing was written. A failure at or after
        the commit is handed to the view with the request, to answer it as it
        would have (it never submits again). A Hub or S3 model is Flask's: its
        submit reads the model's config over the network first.
        """
        length = environ.get("CONTENT_LENGTH", "")
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        if (environ.get("QUERY_STRING") or "HTTP_ORIGIN" in environ or "HTTP_SEC_FETCH_SITE" in environ  # api/crosssite.py
                or not length.isdigit() or (limit is not None and int(length) > limit)):
            return None
        who = self._caller(environ)
        if who is None:
            return None
        raw = environ["wsgi.input"].read(int(length))
        environ["wsgi.input"] = io.BytesIO(raw)  # for Flask, when it answers instead
        if len(raw) != int(length):
            return None
        with self.app.app_context():
            g.principal = who  # what auth.authenticate sets
            try:
                spec = parse_spec(json_object(raw))
                if spec.model.source not in ("local", "upload"):
                    return None
                checked = job_service.check_submit(spec, quota=False)  # the quota: as the job is stored
            except Exception:  # nothing stored: Flask answers it
                return None
            try:
                batches, svc = self.submits, self.app.extensions["quantfarm"]
                if batches is not None and batches.db is svc.db:
                    view = batches.create(checked, svc.settings.team_max_queued)
                else:
                    view = job_service.create(checked, within_quota=True)
                if view is None:  # over the quota, nothing stored: Flask checks again and answers the 429
                    return None
                return self._ok(self.submit_route, view, 201, created_headers(view))
            except Exception as exc:  # stored, or perhaps stored: the view raises it, and Flask's handlers answer it
                environ[SUBMIT_FAILED] = exc
                return None


def install(app: Flask) -> None:
    """Put ``FastPath`` in front of the app's WSGI callable (after every blueprint is registered: it reads their rules)."""
    app.wsgi_app = FastPath(app, app.wsgi_app)
