"""Who is calling: API keys (``Authorization: Bearer``), page sessions, roles and team scope.

Every ``/v1`` request and every page resolves a ``Principal`` before its view
runs. A key belongs to one team and has a role; admins act on every team. With
``QUANTFARM_AUTH=auto`` (the default) and no key in the database, an API bound to
a loopback address treats every caller as a local admin, so ``make run`` needs
no setup; the first key created ends that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass

from flask import Flask, g, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

from api.context import services
from quantfarm.errors import Forbidden, QuantfarmError, Unauthorized
from storage import teams as team_store
from storage.models import DEFAULT_TEAM_ID, utcnow
from storage.teams import Role

log = logging.getLogger(__name__)

# Views that check the body before the caller (the submit order of API.md: body → auth → quota).
DEFERRED = frozenset({"jobs.create_job"})
PUBLIC_PAGES = frozenset({"web.static", "web.signin_page", "web.signin", "web.signout"})
LAST_USED_EVERY = 60.0  # seconds between writes of a key's last_used_at


class AuthConfigError(QuantfarmError):
    code = "auth_config_error"


@dataclass(frozen=True)
class Principal:
    """The caller: a key's team and role (``key_id`` None is the local admin)."""

    key_id: str | None
    team_id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    @property
    def scope(self) -> str | None:
        """The team every lookup is limited to; None for an admin, who sees every team."""
        return None if self.is_admin else self.team_id

    def require(self, role: Role) -> "Principal":
        """Return self, or raise Forbidden when the role is weaker than ``role``."""
        if self.role.rank < role.rank:
            raise Forbidden(f"This needs the {role.value} role; your key is a {self.role.value} key.",
                            details={"role": self.role.value, "required": role.value})
        return self


LOCAL_ADMIN = Principal(None, DEFAULT_TEAM_ID, Role.ADMIN)


class KeyCache:
    """Verified keys for a few seconds, so a request costs a dict lookup, not a database read."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._hits: dict[str, tuple[float, Principal]] = {}
        self._used: dict[str, float] = {}
        self._keys_exist_until = 0.0  # "no key yet" is re-read at most once a second
        self._keys_exist = False

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            hit = self._hits.get(digest)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, digest: str, p: Principal) -> None:
        with self._lock:
            if len(self._hits) > 10_000:
                self._hits.clear()
            self._hits[digest] = (time.monotonic() + self.ttl, p)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._hits = {d: v for d, v in self._hits.items() if v[1].key_id != key_id}

    def due_for_touch(self, key_id: str) -> bool:
        """Say whether the key's last_used_at is due for a write, and if so note it as written now."""
        now = time.monotonic()
        with self._lock:
            if now - self._used.get(key_id, -1e9) < LAST_USED_EVERY:
                return False
            self._used[key_id] = now
            return True

    def touched_recently(self, key_id: str) -> bool:
        """Say whether the key's last_used_at was written less than LAST_USED_EVERY ago (notes nothing)."""
        return time.monotonic() - self._used.get(key_id, -1e9) < LAST_USED_EVERY

    def keys_exist(self, s) -> bool:
        if self._keys_exist:
            return True  # keys are never deleted, only revoked: once true, always true
        now = time.monotonic()
        if now >= self._keys_exist_until:
            self._keys_exist = team_store.any_key_exists(s)
            self._keys_exist_until = now + 1.0
        return self._keys_exist

    def saw_new_key(self) -> None:
        self._keys_exist = True


def _cache() -> KeyCache:
    from flask import current_app

    return current_app.extensions["quantfarm_keys"]


def local_admin_mode() -> bool:
    """Whether callers without a key act as the local admin right now."""
    svc = services()
    if svc.settings.auth == "off":
        return True
    if svc.settings.auth == "on" or not svc.settings.loopback:
        return False
    with svc.db.session() as s:
        return not _cache().keys_exist(s)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(header: str) -> str:
    """Return the key of an ``Authorization: Bearer <key>`` header; raise Unauthorized for any other form."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Send the API key as `Authorization: Bearer <key>`.")
    return token.strip()


def cached_principal(cache: KeyCache, key: str) -> Principal | None:
    """The key's principal when this process verified it within the TTL and its use needs no write; else None.

    No database and no bookkeeping: ``principal_for_key`` is the full answer (a read, a
    401, the last_used_at write), and api/fastpath.py leaves every None to it.
    """
    hit = cache.get(_digest(key))
    if hit is None or hit.key_id is None or not cache.touched_recently(hit.key_id):
        return None
    return hit


def principal_for_key(key: str) -> Principal:
    """Return the principal of an API key; raise Unauthorized for an unknown or revoked key."""
    digest = _digest(key)
    cache = _cache()
    hit = cache.get(digest)
    if hit is not None:
        _touch(hit.key_id)
        return hit
    with services().db.session() as s:
        row = team_store.verify_key(s, key)
        if row is None:
            raise Unauthorized("The API key is unknown or revoked; create a new one with `quantfarm keys create`.")
        p = Principal(row.id, row.team_id, Role(row.role))
    cache.put(digest, p)
    _touch(p.key_id)
    return p


def _touch(key_id: str | None) -> None:
    if key_id is None or not _cache().due_for_touch(key_id):
        return
    try:
        with services().db.session() as s:
            team_store.touch_key(s, key_id, utcnow())
    except Exception:  # bookkeeping only: never fail a request over it
        log.warning("Could not record the use of key %s", key_id, exc_info=True)


def _from_session() -> Principal | None:
    kid, check = session.get("kid"), session.get("kh")
    if not kid or not check:
        return None
    with services().db.session() as s:
        row = s.get(team_store.ApiKey, kid)
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.secret_hash[:32], check):
            return None
        p = Principal(row.id, row.team_id, Role(row.role))
    _touch(p.key_id)
    return p


def _resolve() -> Principal:
    header = request.headers.get("Authorization")
    if header is not None:
        return principal_for_key(bearer_key(header))
    from_cookie = _from_session()
    if from_cookie is not None:
        return from_cookie
    if local_admin_mode():
        return LOCAL_ADMIN
    raise Unauthorized("This needs an API key: send `Authorization: Bearer <key>` (the CLI reads QUANTFARM_API_KEY).")


def authenticate():
    """Resolve the caller before each view; pages without one go to the sign-in page."""
    endpoint = request.endpoint or ""
    is_page = endpoint.startswith("web.")
    if not (request.path.startswith("/v1/") or is_page) or endpoint in PUBLIC_PAGES:
        return None
    try:
        g.principal = _resolve()
    except Unauthorized as exc:
        if is_page:
            return redirect(url_for("web.signin_page", next=request.full_path if request.method == "GET" else None))
        if endpoint in DEFERRED:
            g.auth_error = exc
            return None
        raise
    return None


def current() -> Principal:
    """Return the caller; raise the deferred 401 for a view that checked its body first."""
    p = g.get("principal")
    if p is None:
        raise g.get("auth_error") or Unauthorized("This needs an API key.")
    return p


def require(role: Role) -> Principal:
    """Return the caller if their role is at least ``role`` (403 otherwise)."""
    return current().require(role)


def sign_in(key: str) -> Principal:
    """Start a page session for ``key`` (an HttpOnly, SameSite=Strict cookie); raise Unauthorized."""
    p = principal_for_key(key)
    with services().db.session() as s:
        row = s.get(team_store.ApiKey, p.key_id)
        session.clear()
        session["kid"], session["kh"] = row.id, row.secret_hash[:32]
    session.permanent = True
    return p


def sign_out() -> None:
    session.clear()


def saw_new_key() -> None:
    """Note that a key now exists: loopback callers without one stop acting as the local admin."""
    _cache().saw_new_key()


def forget_key(key_id: str) -> None:
    """Drop a revoked key from this process's cache at once (other processes: within the TTL)."""
    _cache().forget(key_id)


SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"))
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def security_headers(resp):
    """Add the security headers a response does not set itself (and a CSP to pages).

    One pass over the few headers there are: werkzeug's ``setdefault`` builds an
    exception for every header it does not find, on every response.
    """
    headers = resp.headers
    present = {name.lower() for name, _ in headers}
    for name, value in SECURITY_HEADERS:
        if name.lower() not in present:
            headers.add(name, value)
    if "content-security-policy" not in present and (resp.content_type or "").split(";", 1)[0].strip().lower() == "text/html":
        headers.add("Content-Security-Policy", _PAGE_CSP)
    return resp


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]


def check_settings(settings) -> None:
    """Refuse settings that would open the farm to anyone (auth off on a non-loopback address)."""
    if settings.auth == "off" and not settings.loopback:
        raise AuthConfigError(
            f"QUANTFARM_AUTH=off is refused on {settings.host}: anyone who reaches that address would act as an admin. "
            "Bind to 127.0.0.1, or use QUANTFARM_AUTH=on (or auto) and create keys with `quantfarm keys create`."
        )


def session_secret(settings) -> bytes:
    """Derive the cookie-signing key from the farm's secret key ring (one secret to manage)."""
    from quantfarm.secrets import keyring_from_settings

    return keyring_from_settings(settings).derive(b"quantfarm page sessions")


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with the signing serializer built once per key (Flask builds one per request)."""

    _built: tuple[tuple, URLSafeTimedSerializer | None] = ((), None)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        keys = (app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        built = self._built
        if built[0] != keys:
            built = self._built = (keys, super().get_signing_serializer(app))
        return built[1]


def register(app: Flask) -> None:
    """Install authentication, security headers and the host allowlist on ``app``."""
    settings = services_settings(app)
    check_settings(settings)
    app.extensions["quantfarm_keys"] = KeyCache(settings.auth_cache_seconds)
    app.config["SECRET_KEY"] = session_secret(settings)
    app.session_interface = SessionCookies()
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_NAME="quantfarm_session",
                      PERMANENT_SESSION_LIFETIME=12 * 3600)
    if settings.trusted_hosts:
        app.config["TRUSTED_HOSTS"] = list(settings.trusted_hosts)
    elif settings.loopback:
        # DNS rebinding: a page at evil.example resolving to 127.0.0.1 sends Host: evil.example.
        app.config["TRUSTED_HOSTS"] = LOOPBACK_HOSTS
    app.before_request(authenticate)
    app.after_request(security_headers)
    if settings.auth != "on" and settings.loopback:
        log.warning("Auth is %s: while no API key exists, callers on this loopback address act as the local admin. "
                    "Create a key (`quantfarm keys create`) to require keys.", settings.auth)


def services_settings(app: Flask):
    return app.extensions["quantfarm"].settings
