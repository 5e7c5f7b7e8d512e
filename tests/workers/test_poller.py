"""The idle worker's database poll (workers/poller.py): it runs queued jobs with no broker message at all.

The runner is a plain object on a real database; tests/faults/test_redis_restart.py
drives real worker processes through a broker restart.
"""

from __future__ import annotations

import threading
import time

from quantfarm.settings import Settings
from storage import jobs
from storage.artifacts import LocalStore
from tests.workers.test_claims import submit
from workers.poller import Poller
from workers.runner import JobRunner


def test_the_poller_runs_queued_jobs_and_takes_turns_with_wake_ups(db, tmp_path, tiny_llama):
    runner = JobRunner(Settings(home=tmp_path / "home", lease_seconds=30), db, LocalStore(tmp_path / "store"))
    poller = Poller(runner, interval=3600)
    assert poller.poll_once() == []  # nothing queued: nothing run, nothing raised
    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"}
    first = submit(db, body)

    runner._draining.acquire()  # a wake-up is draining on the Celery thread: the poll steps aside at once
    try:
        began = time.monotonic()
        assert poller.poll_once() == [] and time.monotonic() - began < 1
    finally:
        runner._draining.release()
    assert poller.poll_once() == [(first, "succeeded")]

    second = submit(db, body)
    poller.start()  # its first look is at once, not after the interval
    deadline = time.monotonic() + 120
    while db.run(lambda s: jobs.get_job(s, second).status) != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stopper = threading.Thread(target=poller.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive() and runner.preempting  # stopped; a job it ran would have been handed back
    assert runner.drain() == []


def _status(db, job_id: str) -> str:
    return db.run(lambda s: jobs.get_job(s, job_id).status)


def _until(check, seconds: float) -> float:
    """Seconds until ``check()`` is true (fails after ``seconds``)."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < seconds
        time.sleep(0.05)
    return time.monotonic() - began


def test_on_postgresql_the_poller_runs_a_job_at_its_notice_not_after_the_interval(pg_url, tmp_path, tiny_llama, caplog):
    """The poll interval is an hour: each job starts because its INSERT notified the new-jobs channel (no broker
    message exists here). A notice heard while another caller drains is not lost: the skipped look is retried
    shortly. After the listening connection is killed (as a database restart does) the poller listens again."""
    import logging

    import sqlalchemy as sa

    from quantfarm.secrets import KeyRing
    from storage.db import Database
    from tests.conftest import TEST_SECRET_KEY, _truncate

    db = Database(pg_url, keyring=KeyRing([TEST_SECRET_KEY]))
    _truncate(db)
    runner = JobRunner(Settings(home=tmp_path / "home", lease_seconds=30), db, LocalStore(tmp_path / "store"))
    poller = Poller(runner, interval=3600)
    body = {"model": {"source": "local", "path": str(tiny_llama)}, "method": "rtn"}
    caplog.set_level(logging.INFO, logger="workers.poller")
    try:
        poller.start()
        time.sleep(0.5)  # its first look found nothing; it listens
        first = submit(db, body)
        _until(lambda: _status(db, first) == "succeeded", 120)
        # the poller logs what it ran after the drain returns, a moment after the job's row says succeeded
        heard = f"found waiting work by the database's notice of new jobs; ran [('{first}', 'succeeded')]"
        _until(lambda: heard in caplog.text, 10)

        runner._draining.acquire()  # another caller drains: the notice's look is skipped
        try:
            second = submit(db, body)
            time.sleep(1.0)
            assert _status(db, second) == "queued"
        finally:
            runner._draining.release()
        _until(lambda: _status(db, second) != "queued", 5)  # retried within BUSY_RETRY_SECONDS, no second notice
        _until(lambda: _status(db, second) == "succeeded", 120)

        with db.connect_read() as conn:  # every other backend of this database: the listener's among them
            killed = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                          "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                          "AND query LIKE 'LISTEN%'")).scalar()
        assert killed == 1
        time.sleep(1.0)
        third = submit(db, body)
        _until(lambda: _status(db, third) == "succeeded", 120)
    finally:
        poller.stop()
        db.dispose()
