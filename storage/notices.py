"""The database's notices of new jobs (PostgreSQL ``LISTEN``/``NOTIFY``): how an idle worker hears of a submit.

Every INSERT of jobs notifies ``NEW_JOBS`` (a trigger, migration 0007), in the
inserting transaction: the notice is delivered at its commit, so a worker that
hears it always finds the rows, and a rolled-back insert announces nothing. The
submit pushes no broker message on PostgreSQL, so it never waits on or for the
broker: a job submitted while Redis is down starts at once. (The push it replaces
was a second round trip a batch of submits; the load bench measures the same
rate either way: bench/RESULTS.md, API load.) A statement that inserts no row
(every job of it over its team's quota) announces too: a wake-up that finds
nothing to claim.

A notice is only a wake-up, like a broker message: the worker claims the best
runnable job, whatever was inserted. A notice that arrives while nobody listens
(a worker restarting, the database restarting) is lost; the listener's caller
looks for work when it (re)connects and every ``interval`` anyway
(workers/poller.py).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

NEW_JOBS = "quantfarm_new_jobs"  # the channel (its name is fixed in migration 0007 too)
SLICE_SECONDS = 0.25  # how long one wait reads before it looks at its stop event again
RECONNECT_SECONDS = 1.0  # between attempts while the database is away


def announces_new_jobs(db) -> bool:
    """Whether ``db`` notifies ``NEW_JOBS`` of each INSERT of jobs (PostgreSQL; SQLite has no notices)."""
    return db.engine.dialect.name == "postgresql"


def listening_connection(db, channel: str, what: str):
    """A psycopg connection of its own (never the pool's: it is held while it listens) listening on ``channel``, or
    None, logged as a warning naming ``what`` it listens for, when the database cannot be reached."""
    conn = None
    try:
        dialect = db.engine.dialect  # the engine's own connect arguments, outside its pool
        cargs, cparams = dialect.create_connect_args(db.engine.url)
        conn = dialect.connect(*cargs, **cparams)
        conn.autocommit = True
        conn.execute(f"SET application_name = 'quantfarm listens for {what}'")  # what pg_stat_activity shows it as
        conn.execute(f"LISTEN {channel}")
    except Exception as exc:  # noqa: BLE001 - the database is away: try again later
        log.warning("Cannot listen for %s (%s); trying again in %.0f s", what, type(exc).__name__, RECONNECT_SECONDS)
        close_listening(conn)
        return None
    return conn


class NewJobNotices:
    """A connection of its own listening on ``NEW_JOBS``; ``wait`` returns when a notice arrives.

    Made for one thread (a worker's poller). The connection is made at the first
    ``wait`` and again after it breaks; each new connection is reported as a
    notice (``wait`` returns True), since whatever was announced while nobody
    listened is lost.
    """

    def __init__(self, db):
        self.db = db
        self._conn = None  # the listening psycopg connection: its own, never the pool's
        self._next_try = 0.0

    def wait(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Whether a notice (or a new connection) came within ``timeout`` seconds; False at the timeout or at ``stop``.

        Every notice waiting is taken: one wake-up stands for all of them.
        """
        deadline = time.monotonic() + timeout
        while not (stop is not None and stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._conn is None:
                if time.monotonic() >= self._next_try and self._listen():
                    return True
                if stop is not None:
                    stop.wait(min(left, SLICE_SECONDS))
                else:
                    time.sleep(min(left, SLICE_SECONDS))
                continue
            try:
                conn = self._conn
                if list(conn.notifies(timeout=min(left, SLICE_SECONDS), stop_after=1)):
                    list(conn.notifies(timeout=0))  # the rest waiting: the same wake-up
                    return True
            except Exception as exc:  # noqa: BLE001 - the connection broke (a database restart): listen again
                log.warning("Lost the database connection that listens for new jobs (%s); listening again", type(exc).__name__)
                self.close()
                self._next_try = time.monotonic()
        return False

    def _listen(self) -> bool:
        self._conn = listening_connection(self.db, NEW_JOBS, "new jobs")
        if self._conn is None:
            self._next_try = time.monotonic() + RECONNECT_SECONDS
        return self._conn is not None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        close_listening(conn)


def close_listening(conn) -> None:
    """Close a ``listening_connection`` (None: nothing), broken or not."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection's close
            log.debug("Closing the listening connection failed", exc_info=True)
