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
