"""Group commit of the fast path's submits (PostgreSQL): the submits of one process that arrive together are stored
by one statement.

A submit's own work (its checks, its row, the view it answers with) stays on its
request's thread. Storing is the part that waits: while one thread's statement
is at the database, the submits that arrive queue up here, and when it returns,
one of them stores all of them in one statement (``storage.jobs.insert_jobs``:
one commit, each job within its team's quota, counting the batch's own jobs of
that team before it) and lets each of the other threads answer. Nothing waits
for a batch to fill: a submit that finds no statement running runs its own at
once. A statement, a commit and a round trip per job were most of the
database's and much of the API's CPU for a submit under load.

No broker message follows: the statement's insert announces its jobs to the idle
workers at its commit (storage/notices.py). The Redis push it replaces was a
second round trip a batch, during which the next batch could not start; without
it the batches are smaller (more statements), and the load bench measures the
same rate (bench/RESULTS.md, API load).

Failures, per submit as before: a job whose row cannot be bound fails alone (it is
bound on its own thread); over the quota, nothing of that job is stored and the
caller hears None (Flask answers the 429). When the statement fails with the
database's own error (the statement was rolled back whole: nothing stored), each
job of a batch of several is stored again on its own, so one bad row fails only
its own submit; any other failure (a broken connection: perhaps committed) is
every job's error, raised on its thread and never stored again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import exc as sa_exc

from api import job_service
from storage import jobs as job_store

log = logging.getLogger(__name__)

MAX_BATCH = 64  # jobs one statement stores at most (a process has as many submits at once as threads)
# Statements one process runs at once. One: the largest batches (~4 jobs a statement under the load bench, 8 threads),
# and a team's quota checked by one statement after another in a process. Two or four made no difference to the load
# bench's rate that its noise would show (bench/RESULTS.md, API load), with smaller batches.
LEADERS = 1
# SQLSTATE classes of errors after which the connection or the server's state is in doubt: never stored again.
_IN_DOUBT = ("08", "53", "57", "58", "XX")


class _Submit:
    """One submit waiting in ``SubmitBatches``: its bound row, and what became of it."""

    __slots__ = ("batch", "error", "job_id", "ready", "row", "stored")

    def __init__(self, row: str, job_id: str):
        self.row, self.job_id = row, job_id
        self.ready = threading.Lock()
        self.ready.acquire()  # released when it is done, or when it is to store the next batch (``batch``)
        self.batch: list[_Submit] | None = None
        self.stored: bool | None = None
        self.error: BaseException | None = None


class SubmitBatches:
    """One per app (process): ``create`` is ``job_service.create(checked, within_quota=True)``, batched."""

    def __init__(self, db, max_batch: int = MAX_BATCH, leaders: int = LEADERS):
        self.db, self.max_batch, self.leaders = db, max_batch, leaders
        self._lock = threading.Lock()
        self._waiting: list[_Submit] = []
        self._leading = 0  # threads storing a batch now (each hands the next batch to a waiting thread)
        self.batches = 0  # statements run (the tests and the bench read these two)
        self.jobs = 0

    def create(self, checked: job_service.Checked, quota: int, via: str = "api") -> dict | None:
        """Store the checked job within its team's quota (``quota``: the farm's limit); return its view.

        None when its team is over its quota (nothing stored). Must run in the app's
        context (the view reads the app's services).
        """
        values = job_store.new_job_values(**job_service.job_fields(checked))
        if not self._store(_Submit(job_store.batch_row(self.db.reader.dialect, values, quota), values["id"])):
            return None
        return job_service.created(values, checked, via)

    def _take(self) -> list[_Submit]:
        """The next batch: the submits waiting longest (the lock held)."""
        batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        return batch

    def _store(self, me: _Submit) -> bool:
        with self._lock:
            self._waiting.append(me)
            batch = None
            if self._leading < self.leaders:
                self._leading += 1
                batch = self._take()
        if batch is None:
            me.ready.acquire()  # done by another thread's batch, or handed the next batch
            batch = me.batch
        if batch is not None:
            self._lead(batch)
        if me.error is not None:
            raise me.error
        return bool(me.stored)

    def _lead(self, batch: list[_Submit]) -> None:
        """Store ``batch`` (this thread's submit among them), let the others answer, hand the next batch on."""
        try:
            self._run(batch)
        except BaseException as exc:  # noqa: BLE001 - whatever it was, it is every unfinished submit's error
            for s in batch:
                if s.stored is None and s.error is None:
                    s.error = exc
        finally:
            for s in batch:
                if s.ready.locked():
                    s.ready.release()
            with self._lock:
                nxt = self._take()
                if nxt:
                    nxt[0].batch = nxt
                else:
                    self._leading -= 1
            if nxt:
                nxt[0].ready.release()

    def _run(self, batch: list[_Submit]) -> None:
        """Store ``batch``: each submit's ``stored`` or ``error`` set."""
        self.batches += 1
        self.jobs += len(batch)
        try:
            stored = job_store.insert_jobs(self.db, [s.row for s in batch])
        except sa_exc.DBAPIError as err:
            if len(batch) == 1 or not _rolled_back(err):
                for s in batch:
                    s.error = err
                return
            log.warning("A batch of %s submits failed (%s); storing each on its own", len(batch), type(err.orig).__name__)
            stored = set()
            for s in batch:
                try:
                    stored |= job_store.insert_jobs(self.db, [s.row])
                except Exception as one:  # noqa: BLE001 - that submit's own error
                    s.error = one
        for s in batch:
            if s.error is None:
                s.stored = s.job_id in stored


def _rolled_back(err: sa_exc.DBAPIError) -> bool:
    """Whether the database answered the statement with its own error (so nothing of it was stored), its connection sound."""
    state: Any = getattr(err.orig, "sqlstate", None)
    return bool(state) and not err.connection_invalidated and not state.startswith(_IN_DOUBT)
