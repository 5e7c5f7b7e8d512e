"""What the farm needs from gunicorn whatever its command line says (gunicorn reads ./gunicorn.conf.py).

Every worker of one master writes its Prometheus counts into one directory, so
a scrape, answered by any worker, reports the sum over all of them.
"""

import glob
import os
import shutil
import tempfile

_made: list[str] = []


def on_starting(server):
    """Point this master's workers at a Prometheus directory holding no counts from an earlier run."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.unlink(stale)
    else:
        path = tempfile.mkdtemp(prefix="quantfarm-metrics-")
        _made.append(path)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # the workers inherit it before importing prometheus_client


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)

# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new connections over them. On one
# shared socket, whichever worker woke first accepted a burst of connections: a client's keep-alive connections (a
# load balancer's, a CI pipeline's) could all land on one worker, which then served them on one core (its GIL) while
# the other sat idle. Seen under the load bench in 3 of 7 runs of POST /v1/jobs: one worker at 97% of a core, the
# other at 0%, half the rate (bench/RESULTS.md, API load).
reuse_port = True
