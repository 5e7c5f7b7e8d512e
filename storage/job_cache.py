"""The rows of the jobs an API process answered, kept until the database says the job changed (PostgreSQL).

Clients poll their jobs: most GETs of one job find it as it was a moment ago,
and its database round trip was most of such a GET's cost (bench/RESULTS.md, API
load). ``JobRowsCache`` keeps each job's rows as read (storage/job_reads.py:
``job_rows_by_id``, what the view is made from) and forgets them when the job
changes. A page of jobs (api/job_service.py: ``read_page_rows``) still asks the
database which jobs are on it, with their statuses, and reads the rows of only
the jobs not kept, or kept with another status than the database's (so a page
chosen by status never shows one of another):

- **Another process's change** (a worker's progress, another API process's
  cancel): every change to a job's row or its artifacts notifies the job's id on
  ``JOB_CHANGES`` at its commit (triggers, migration 0008). A thread of this
  process listens on a connection of its own and forgets that job. The rows
  served can be as old as that notice's way here: milliseconds.
- **This process's own write**, through any SQLAlchemy engine of the process:
  every statement that is not a SELECT forgets every job, and an ORM session's
  commit forgets again once the database has committed (a GET of another thread
  may have read the old rows just before), all before the call that wrote
  returns. A caller that changed a job through this process reads the change
  at once. (The API's writes to jobs and artifacts are ORM sessions'; its
  raw-cursor writes only insert new jobs.)
- **Nothing heard:** rows are kept and served only while the listening
  connection is up, on a database that has the triggers (a rolling upgrade
  may run this code before migration 0008), and never in a forked child
  (its parent's listener is not its own). When it breaks (a database restart) everything is
  forgotten and nothing is kept until it listens again, since the notices sent
  meanwhile are lost. However it was heard, no rows are served older than
  ``MAX_AGE`` seconds (a notice that never came, a connection that died without
  a word).

A read stores its rows only if nothing was forgotten while it ran (a
generation counter): rows read just before a change, stored just after its
notice, would otherwise be kept. The listener runs while the cache is used: it
starts at the first lookup and stops after ``IDLE_STOP`` seconds without one,
or when the Database is disposed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from storage.job_reads import JOB_COLUMNS

log = logging.getLogger(__name__)

JOB_CHANGES = "quantfarm_job_changes"  # the channel (its name is fixed in migration 0008 too)
EVERY_JOB = "*"  # a notice's text for every job (a TRUNCATE)
MAX_AGE = 2.0  # seconds: rows older than this are read again, whatever was heard
SIZE = 4096  # jobs kept at most (emptied when full)
MAX_CHARS = 32 * 1024 * 1024  # the kept rows' text at most (emptied when over): a spec can be a megabyte
IDLE_STOP = 10.0  # seconds without a lookup after which the listener stops (and starts again at the next)
SLICE_SECONDS = 0.25  # how long one wait for notices reads before it looks at its stop and idle state
RECONNECT_SECONDS = 1.0  # between attempts to listen while the database is away
NO_TRIGGERS_SECONDS = 30.0  # between looks for the triggers while the database has none (not migrated yet)
TRIGGERS = ("jobs_changed", "artifacts_changed", "jobs_truncated", "artifacts_truncated")  # migration 0008's
TEAM = JOB_COLUMNS.index("team_id")  # its position in a job's row

_caches: "weakref.WeakSet[JobRowsCache]" = weakref.WeakSet()  # every cache of this process
_hooked = False
_hook_lock = threading.Lock()


class JobRowsCache:
    """Job rows by job id, forgotten at each job's change notice (see the module's docstring)."""

    def __init__(self, db):
        self.db = db
        self._rows: dict[str, tuple[Any, float, int]] = {}  # job id -> (its rows, when they were read, their text)
        self._lock = threading.Lock()
        self._generation = 0  # moved by every forget: a read that saw it move stores nothing
        self._chars = 0  # the text of the rows kept (about)
        self._live = False  # listening: rows may be kept and served
        self._thread: threading.Thread | None = None
        self._used = time.monotonic()
        self._closed = threading.Event()
        _watch_local_writes()
        with _hook_lock:
            _caches.add(self)

    # The GET's side.

    def get(self, job_id: str, team_id: str | None):
        """The job's kept rows when they may be served to a caller of ``team_id`` (None: every team), else None."""
        now = self._used = time.monotonic()
        if not self._live:
            self._start()
            return None
        entry = self._rows.get(job_id)
        if entry is None or now - entry[1] > MAX_AGE:
            return None
        rows = entry[0]
        return rows if team_id is None or rows[0][TEAM] == team_id else None

    def token(self) -> tuple[int, float] | None:
        """Taken before a read whose rows ``put`` may keep (None: nothing is kept now); the rows' age counts from it."""
        return (self._generation, time.monotonic()) if self._live else None

    def put(self, job_id: str, rows, token: tuple[int, float] | None) -> None:
        """Keep ``rows`` (read after ``token`` was taken) unless something was forgotten since."""
        if token is None:
            return
        chars = sum(len(value) for row in rows for value in row if type(value) is str)
        if chars > MAX_CHARS:
            return
        with self._lock:
            if token[0] != self._generation or not self._live:
                return
            old = self._rows.pop(job_id, None)
            if old is not None:
                self._chars -= old[2]
            if len(self._rows) >= SIZE or self._chars + chars > MAX_CHARS:
                self._rows.clear()
                self._chars = 0
            self._rows[job_id] = (rows, token[1], chars)
            self._chars += chars

    # The notices' side.

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._generation += 1
            entry = self._rows.pop(job_id, None)
            if entry is not None:
                self._chars -= entry[2]

    def forget_all(self) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()
            self._chars = 0

    def close(self) -> None:
        """Stop listening and keep nothing more (``Database.dispose``)."""
        self._closed.set()
        self._set_live(False)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * SLICE_SECONDS + 1)

    @property
    def live(self) -> bool:
        return self._live

    def _after_fork(self) -> None:
        """In a forked child: the parent's listener (thread and connection) is not the child's; nothing is kept."""
        self._lock = threading.Lock()
        self._rows, self._chars, self._live, self._thread = {}, 0, False, None
        self._generation += 1

    def _set_live(self, live: bool) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()
            self._chars = 0
            self._live = live

    def _start(self) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._listen, name="quantfarm-job-changes", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        from storage import notices

        conn = None
        try:
            while not self._closed.is_set() and time.monotonic() - self._used < IDLE_STOP:
                if conn is None:
                    conn = notices.listening_connection(self.db, JOB_CHANGES, "job changes")
                    if conn is None:
                        self._closed.wait(RECONNECT_SECONDS)
                        continue
                    if not _notices_sent(conn):  # a database not migrated yet: nothing would be heard
                        log.warning("The database sends no job-change notices (migration 0008 has not run); "
                                    "job rows are read every time")
                        notices.close_listening(conn)
                        conn = None
                        self._closed.wait(NO_TRIGGERS_SECONDS)
                        continue
                    self._set_live(True)  # forgets everything: notices sent before now were not heard
                try:
                    for notice in conn.notifies(timeout=SLICE_SECONDS):
                        if notice.payload == EVERY_JOB:
                            self.forget_all()
                        else:
                            self.forget(notice.payload)
                except Exception as exc:  # noqa: BLE001 - the connection broke (a database restart): listen again
                    self._set_live(False)
                    log.warning("Lost the database connection that listens for job changes (%s); listening again",
                                type(exc).__name__)
                    notices.close_listening(conn)
                    conn = None
        finally:
            self._set_live(False)
            notices.close_listening(conn)
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None


def _notices_sent(conn) -> bool:
    """Whether the database has migration 0008's triggers (a rolling upgrade may run this code on an older schema)."""
    [(found,)] = conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname = ANY(%s)",
                              (list(TRIGGERS),)).fetchall()
    return found == len(TRIGGERS)


def _forget_everywhere() -> None:
    with _hook_lock:  # a WeakSet changed while copied raises
        caches = list(_caches)
    for cache in caches:
        cache.forget_all()


def _after_fork_in_child() -> None:
    global _hook_lock
    _hook_lock = threading.Lock()
    for cache in list(_caches):
        cache._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
_wrote = threading.local()  # .pending: this thread wrote since its last commit or rollback


def _watch_local_writes() -> None:
    """Have every statement but a SELECT, on any engine of this process, forget every job; and the commit after it
    again, once the database has committed (an ORM session's ``after_commit``; Core's ``commit`` event comes before the
    driver's commit, while a GET of another thread could still read, and keep, the rows as they were)."""
    global _hooked
    with _hook_lock:
        if _hooked:
            return

        @event.listens_for(Engine, "after_cursor_execute")
        def _statement(conn, _cursor, statement, _params, _context, _executemany):
            if not statement.lstrip()[:6].upper().startswith("SELECT"):
                _wrote.pending = True
                _forget_everywhere()

        @event.listens_for(Engine, "commit")
        def _committing(conn):
            if getattr(_wrote, "pending", False):
                _forget_everywhere()  # and again after it, below

        @event.listens_for(Session, "after_commit")
        def _committed(_session):
            if getattr(_wrote, "pending", False):
                _wrote.pending = False
                _forget_everywhere()

        @event.listens_for(Engine, "rollback")
        def _rolled_back(conn):
            _wrote.pending = False

        _hooked = True
