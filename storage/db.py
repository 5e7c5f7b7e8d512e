"""Engine and session factory for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")

# SQLSTATE classes that mean "the server or the connection is the problem, try again":
# connection exceptions, operator intervention (shutdown, restart), too many connections,
# and serialization failures / deadlocks (the transaction was rolled back as a whole).
_TRANSIENT_SQLSTATES = ("08", "57P", "53300", "40001", "40P01")
_TRANSIENT_SQLITE = {"SQLITE_BUSY", "SQLITE_LOCKED"}


def is_transient(err: BaseException) -> bool:
    """Say whether ``err`` means the database is unreachable or busy (worth a retry, a 503 to clients)."""
    if isinstance(err, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True
    if not isinstance(err, sa_exc.DBAPIError):
        return False
    if err.connection_invalidated:
        return True
    orig = err.orig
    state = getattr(orig, "sqlstate", None)
    if state:
        return state.startswith(_TRANSIENT_SQLSTATES)
    name = getattr(orig, "sqlite_errorname", None)
    if name is not None:
        return name in _TRANSIENT_SQLITE
    # psycopg's failures to connect (refused, reset, server gone) carry no SQLSTATE.
    return isinstance(err, (sa_exc.OperationalError, sa_exc.InterfaceError))


def make_engine(url: str, **kwargs) -> Engine:
    """Create an engine with the settings each backend needs for many processes."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL lets the API read while a worker writes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # hide_parameters: a job row's bound values hold secrets; keep them out of error messages and logs.
    # connect_timeout: a database that does not answer must fail a request (a 503), not hang it.
    engine = create_engine(url, hide_parameters=True, pool_size=10, max_overflow=10, connect_args={"connect_timeout": 5}, **kwargs)
    _ping_when_idle(engine)
    _lean_json(engine)
    return engine


# A kept reader connection (held_read) unused this long goes back to the pool (whose checkout pings one idle this long).
HELD_IDLE_SECONDS = 1.0
# At most this many reader connections kept at once (the pool's own size, leaving its overflow to everything else).
HELD_MAX = 10


def _reusable(conn: Connection) -> bool:
    """Whether a reader connection is fit to keep: open, valid, and in no transaction on the server. SQLAlchemy's own
    transaction (a Core statement begins one) is ended first, as closing the connection would."""
    if conn.closed or conn.invalidated:
        return False
    if conn.in_transaction():
        try:
            conn.rollback()  # on an autocommit connection: no round trip
        except Exception:  # noqa: BLE001 - not fit to keep
            return False
    dbapi_conn = conn.connection.dbapi_connection
    if dbapi_conn is None or getattr(dbapi_conn, "closed", False):
        return False
    info = getattr(dbapi_conn, "info", None)  # psycopg: the server's view; SQLite has none
    return info is None or info.transaction_status == 0  # psycopg.pq.TransactionStatus.IDLE


def _autocommit_engine(url: str) -> Engine:
    """PostgreSQL connections in autocommit, returned to the pool without the rollback SQLAlchemy's reset calls.

    An autocommit connection holds no transaction, so the reset's rollback did nothing but its calls, on every checkin
    (a few µs of each read); a connection that holds one anyway (a statement that opened one) is still rolled back.
    """
    from psycopg.pq import TransactionStatus

    engine = make_engine(url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None)

    @event.listens_for(engine, "checkin")
    def _idle(dbapi_conn, _record):
        if dbapi_conn is not None and not dbapi_conn.closed and dbapi_conn.info.transaction_status != TransactionStatus.IDLE:
            dbapi_conn.rollback()

    return engine


def _lean_json(engine: Engine) -> None:
    """Decode json columns with the decoder itself: ``json.loads`` on bytes sniffs the encoding and checks types first.

    A page of jobs decodes two json values a row; the wrapper was most of that cost.
    PostgreSQL validated the text on the way in; the connection speaks UTF-8.
    """
    from psycopg.types.json import set_json_loads

    @event.listens_for(engine, "connect")
    def _set(dbapi_conn, _record):
        set_json_loads(_json_loads, dbapi_conn)  # one module-level function: psycopg caches a loader per function


_decoder = json.JSONDecoder()
_scan_json = _decoder.scan_once  # the C scanner: decode() adds two whitespace regex matches around it


def _json_loads(data: bytes) -> Any:
    return json_text(str(data, "utf-8"))


def json_text(text: str) -> Any:
    """A json column's value from its text, decoded as psycopg's loader does (``_json_loads``)."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:  # leading whitespace (text written by hand): the full decoder
        return _decoder.decode(text)
    return value if end == len(text) else _decoder.decode(text)


def _ping_when_idle(engine: Engine, idle_seconds: float = 1.0) -> None:
    """Ping a pooled connection at checkout only if it sat idle (pool_pre_ping pings every time: a round trip per request).

    A connection used within the last second is live, or the server went down so
    recently that the request fails like any other during an outage (a 503).
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record):
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        last = record.info.get("checked_in")
        if last is None or time.monotonic() - last < idle_seconds:
            return  # a new connection, or one in steady use
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool retries the checkout with a fresh connection
            raise sa_exc.DisconnectionError() from exc


def after_commit(s: Session, fn) -> None:
    """Run ``fn`` after the session's transaction commits (dropped on rollback)."""
    s.info.setdefault("after_commit", []).append(fn)


class _LazySession:
    """Stands for a Session made by ``make`` at the first attribute looked up on it (``Database.read_when_needed``)."""

    __slots__ = ("_make", "_made")

    def __init__(self, make: Callable[[], Session]):
        self._make, self._made = make, None

    def __getattr__(self, name: str) -> Any:
        made = self._made
        if made is None:
            made = self._made = self._make()
        return getattr(made, name)


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, url: str, keyring=None, *, retry_seconds: float = 0.0):
        self.url = url
        # How long ``run`` keeps retrying while the database is unreachable (workers ride out a restart).
        self.retry_seconds = retry_seconds
        # Called with a delivery id after a commit that created it (set by processes that can enqueue).
        self.notify_webhook = None
        self.engine = make_engine(url)
        # Encrypts job secrets and team credentials (storage.models.EncryptedJSON reads it here).
        self.engine.dialect.quantfarm_keyring = keyring
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads run in autocommit: no BEGIN/COMMIT round trips (each statement sees committed rows). On PostgreSQL
        # they have a pool of their own, opened in autocommit: an option on the writers' engine would set the
        # isolation level at every checkout and reset it at every checkin (a tenth of a GET's CPU).
        self.reader = self.engine if url.startswith("sqlite") else _autocommit_engine(url)
        self.reader.dialect.quantfarm_keyring = keyring
        self.readers = sessionmaker(self.reader, expire_on_commit=False)
        self._kept: list[tuple[Connection, float]] = []  # ``held_read``'s idle ones and when each was put back, the last on top
        self._held_all: set[Connection] = set()
        self._held_lock = threading.Lock()
        self._job_rows = None  # ``job_rows``, made at its first use

    @property
    def job_rows(self):
        """PostgreSQL: the jobs' rows this process read, kept until each job's change notice (storage/job_cache.py);
        None on SQLite (no notices)."""
        cache = self._job_rows
        if cache is None and self.reader is not self.engine:
            from storage.job_cache import JobRowsCache

            with self._held_lock:
                if self._job_rows is None:
                    self._job_rows = JobRowsCache(self)
                cache = self._job_rows
        return cache

    @classmethod
    def from_settings(cls, settings, *, retry_seconds: float = 0.0) -> "Database":
        """Open the farm's database with the key ring its settings name."""
        from quantfarm.secrets import keyring_from_settings

        return cls(settings.resolved_database_url, keyring=keyring_from_settings(settings), retry_seconds=retry_seconds)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on error.

        Callbacks registered with ``after_commit`` run once the commit succeeded
        (enqueue only after the transaction that created the work commits).
        """
        s = self.sessions()
        s.info["notify_webhook"] = self.notify_webhook
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            callbacks = s.info.pop("after_commit", [])
            s.close()
        for fn in callbacks:
            fn()

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """Yield a session for reads only: autocommit, so no BEGIN/COMMIT round trips (each query sees committed rows)."""
        s = self.readers()
        try:
            yield s
        finally:
            s.close()

    @contextlib.contextmanager
    def read_when_needed(self) -> Iterator[Session]:
        """``read``, with the session made at its first use: checks that may need no statement at all (a submit's,
        of a local model without credentials or an estimate) pay nothing for it. Closed on exit if it was made."""
        lazy = _LazySession(self.readers)
        try:
            yield lazy  # type: ignore[misc]
        finally:
            if lazy._made is not None:
                lazy._made.close()

    def write_together(self, writes: list) -> None:
        """Run ``(lean.Fixed, params)`` writes as one transaction, committed on return (no Session).

        PostgreSQL: one round trip, a pipeline on an autocommit connection
        (``lean.write_together``); SQLite: a plain transaction.
        """
        from storage import lean

        if self.reader is self.engine:
            with self.engine.begin() as conn:
                for fixed, params in writes:
                    fixed.run(conn, params)
            return
        with self.reader.connect() as conn:
            lean.write_together(conn, writes)

    @contextlib.contextmanager
    def held_read(self) -> Iterator[Connection]:
        """``connect_read``'s connection, kept from one use to the next (the fast path's reads, the batched submits'
        statements).

        A pool checkout and checkin a request were about a fifth of a GET's CPU on the fast path, so the process keeps
        the connections its uses put back, as Django keeps a connection between requests (``CONN_MAX_AGE`` with health
        checks). They are handed out last used first: the process's statements run on as few database backends as ran
        at once, each warm (handed round, 8 backends that each sat idle in between cost PostgreSQL more CPU for the same
        statements: ``bench.submit_cpu``, 8 threads, alternated, its backends 133-213 µs a submit against 108-117 last
        used first). They belong to the process, never to a thread: a request may run on a thread or a greenlet that
        ends with it (gunicorn's gevent workers, werkzeug's threads), and a connection kept by one that ended would stay
        checked out of the pool for good.

        A connection found unused for ``HELD_IDLE_SECONDS`` or more is pinged first, and one that died (a database
        restart, an idle timeout) is replaced by a fresh one from the pool. (It was given back to the pool, whose
        checkout pings a connection idle that long; but its checkin had just stamped it as fresh, so the same dead
        connection came back unpinged.) Each put back also returns the oldest kept one to the pool if it sat that long, so the kept ones shrink to what runs at once again after a burst. At most ``HELD_MAX`` are kept:
        a use beyond them checks one out of the pool and back in. Kept ones never go back to the pool while in steady
        use, so without that bound more uses at once than the pool holds (werkzeug's threads and gunicorn's gevent
        workers have no fixed number) would wait in the pool's queue while the connections were put back on the stack,
        never in the pool, and fail at its timeout. A transaction a use left open
        is rolled back; a connection left invalidated or closed goes back (the pool discards it), so the next use gets a
        fresh one. ``dispose`` closes every kept one.
        """
        kept = self._kept
        try:
            conn, at = kept.pop()  # list.pop and append are atomic: no lock on the way in and out
        except IndexError:
            conn = None
        if conn is not None and time.monotonic() - at >= HELD_IDLE_SECONDS and not self._alive(conn):
            conn = self._unhold(conn)
        held = conn is not None
        if conn is None:
            conn = self.reader.connect()
            with self._held_lock:
                if len(self._held_all) < HELD_MAX:
                    self._held_all.add(conn)
                    held = True
        try:
            yield conn
        finally:
            now = time.monotonic()
            if not held:  # more uses at once than are kept: this one was the pool's for this use only
                conn.close()
            elif _reusable(conn):
                kept.append((conn, now))
            else:
                self._unhold(conn)
            try:
                oldest = kept[0]
            except IndexError:
                oldest = None
            if oldest is not None and now - oldest[1] >= HELD_IDLE_SECONDS:
                try:
                    kept.remove(oldest)  # atomic; another use may have taken it meanwhile
                except ValueError:
                    pass
                else:
                    self._unhold(oldest[0])

    def _alive(self, conn: Connection) -> bool:
        """Ping a kept connection that sat unused; one that fails it is invalidated (the pool discards it)."""
        try:
            self.reader.dialect.do_ping(conn.connection.dbapi_connection)
            return True
        except Exception:  # noqa: BLE001 - dead (a database restart, an idle timeout): a fresh one instead
            conn.invalidate()
            return False

    def _unhold(self, conn: Connection) -> None:
        with self._held_lock:
            self._held_all.discard(conn)
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection's close: the pool discards it
            log.debug("Closing a kept reader connection failed", exc_info=True)
        return None

    def connect_read(self) -> Connection:
        """Return a Core connection for reads (use it as a context manager): no Session, no transaction."""
        return self.reader.connect()

    def run(self, fn: Callable[[Session], T], *, what: str = "database call") -> T:
        """Run ``fn(session)`` in a transaction, retried with backoff while the database is unreachable.

        Retries stop after ``retry_seconds``; the last error is raised then. Only a
        whole transaction is retried, so ``fn`` must do nothing outside the session.
        """
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                with self.session() as s:
                    return fn(s)
            except Exception as err:
                if not is_transient(err) or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: database unreachable (%s); retrying in %.1fs", what, type(getattr(err, "orig", None) or err).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def ping(self) -> bool:
        from sqlalchemy import text

        with self.read() as s:
            s.execute(text("SELECT 1"))
        return True

    def dispose(self) -> None:
        if self._job_rows is not None:
            self._job_rows.close()
        with self._held_lock:
            held, self._held_all = list(self._held_all), set()
            self._kept.clear()
        for conn in held:  # every kept connection (no request runs any more)
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                log.debug("Closing a kept reader connection failed", exc_info=True)
        self.engine.dispose()
        self.reader.dispose()
