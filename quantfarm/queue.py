"""Broker settings and task dispatch by name, shared by the API and the workers.

The API enqueues by task name (``send_task``, or on Redis the same message pushed by
``RedisWakeups``), so it never imports the workers.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

from quantfarm.settings import Settings

RUN_JOB = "quantfarm.run_job"
SWEEP = "quantfarm.sweep"
DELIVER_WEBHOOK = "quantfarm.deliver_webhook"
GC = "quantfarm.gc"
_HOSTNAME = socket.gethostname()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings: the DB holds all state, so ack late, prefetch one, keep no results."""
    url = settings.resolved_broker_url
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": settings.queue,
        "task_routes": {
            RUN_JOB: {"queue": settings.queue},
            SWEEP: {"queue": settings.service_queue},
            DELIVER_WEBHOOK: {"queue": settings.service_queue},
            GC: {"queue": settings.service_queue},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        # No worker_max_tasks_per_child: job workers run the solo pool (the job runs in the
        # worker process itself, which the pool setting would not recycle); the engine frees
        # each layer and hands the heap back, so memory does not build up across jobs.
        "broker_transport_options": {},
    }
    if url.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    elif url.startswith(("redis", "rediss")):
        # Our leases and sweeper handle lost workers; keep Redis from redelivering running jobs.
        conf["broker_transport_options"] = {"visibility_timeout": 12 * 3600}
    return conf


class Dispatcher:
    """Sends tasks by name: jobs to the job queue, webhooks to the service queue.

    On Redis a job's wake-up is pushed by ``RedisWakeups`` (one client per
    process, a ready-made message); other brokers (the embedded filesystem one)
    go through Celery's ``send_task``.
    """

    def __init__(self, settings: Settings):
        from celery import Celery

        self.app = Celery("quantfarm-client")
        self.app.conf.update(celery_config(settings))
        url = settings.resolved_broker_url
        self.wakeups = RedisWakeups(url, settings.queue) if url.startswith(("redis://", "rediss://")) else None

    def run_job(self, job_id: str) -> None:
        """Wake a worker (the id is a hint: the worker claims the best runnable job)."""
        if self.wakeups is not None:
            self.wakeups.send(RUN_JOB, [job_id])
        else:
            self.app.send_task(RUN_JOB, args=[job_id])

    def deliver_webhook(self, delivery_id: str, countdown: float = 0) -> None:
        self.app.send_task(DELIVER_WEBHOOK, args=[delivery_id], countdown=countdown or None)

    def ping(self) -> bool:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return True


class RedisWakeups:
    """Celery task messages pushed straight onto a Redis queue, with one redis-py client per process.

    ``send_task`` costs a submit about a quarter of its CPU: kombu builds a new
    redis-py client (and its callback table) for each of a publish's two round
    trips (the exchange's bindings, then the push), and Celery assembles the
    message field by field. This builds the same message (Celery's task protocol
    2 in kombu's Redis envelope, as ``send_task`` sends it to the default
    exchange) and pushes it with one LPUSH on a pooled connection; a Celery
    worker consuming the queue cannot tell the two apart
    (tests/api/test_dispatch_redis.py compares them field by field).
    """

    _EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def __init__(self, url: str, queue: str):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.queue = queue
        self.reply_to = str(uuid.uuid4())  # Celery's client app has one such id per process; nothing replies to it
        # Thread-safe (a pool of connections); a forked child opens its own. A connection the server dropped
        # (a Redis restart) is retried on a fresh one; a broker that is down fails the send within seconds.
        self._idle: list = []  # ``send``'s connections not in use, the last used on top (``_take``)
        self._idle_pid = os.getpid()
        self._templates: dict[tuple[str, int], tuple[str, ...]] = {}  # (task name, pid) -> ``_template``
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2), retry_on_error=[redis.ConnectionError, redis.TimeoutError])

    def envelope(self, name: str, args: list[Any], task_id: str, delivery_tag: str, pid: int) -> dict[str, Any]:
        """The message of task ``name`` with ``args`` (its ids given) as the object ``message`` encodes."""
        body = base64.b64encode(json.dumps([args, {}, self._EMBED]).encode()).decode()
        headers = {
            "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
            "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": repr(args), "kwargsrepr": "{}", "origin": f"gen{pid}@{_HOSTNAME}", "ignore_result": None,
            "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        }
        properties = {
            "correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": self.queue}, "priority": 0, "body_encoding": "base64",
            "delivery_tag": delivery_tag,
        }
        return {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                "headers": headers, "properties": properties}

    def message(self, name: str, args: list[Any]) -> bytes:
        """``json.dumps(self.envelope(...))`` with fresh ids, encoded: the same bytes, made from that text's parts.

        Every message of one task name in one process is that text with its ids, body and
        args' repr put in (each as ``json.dumps`` writes a string), so the envelope is
        encoded once (``_template``) rather than a nested object each time: about two
        thirds of a message's cost. A test compares the bytes with the envelope's.
        """
        random = os.urandom(32)  # two uuid4s, as uuid.uuid4() makes each
        task_id = str(uuid.UUID(bytes=random[:16], version=4))
        delivery_tag = str(uuid.UUID(bytes=random[16:], version=4))
        parts = self._template(name)
        body = base64.b64encode(json.dumps([args, {}, self._EMBED]).encode()).decode()
        # A uuid's text and base64 need no JSON escapes: quoted, they are json.dumps's text of them.
        tid = f'"{task_id}"'
        return "".join((parts[0], f'"{body}"', parts[1], tid, parts[2], tid, parts[3], json.dumps(repr(args)), parts[4],
                        tid, parts[5], f'"{delivery_tag}"', parts[6])).encode()

    _SLOTS = ("body", "id", "root_id", "argsrepr", "correlation_id", "delivery_tag")

    def _template(self, name: str) -> tuple[str, ...]:
        """The encoded envelope of task ``name`` in this process, split where ``message`` puts in each slot's value."""
        key = (name, os.getpid())  # the origin names the process: a forked child makes its own
        parts = self._templates.get(key)
        if parts is None:
            marks = {slot: f"@@quantfarm-{slot}-{uuid.uuid4().hex}@@" for slot in self._SLOTS}
            env = self.envelope(name, [], marks["id"], marks["delivery_tag"], key[1])
            env["body"] = marks["body"]
            env["headers"]["root_id"] = marks["root_id"]
            env["headers"]["argsrepr"] = marks["argsrepr"]
            env["properties"]["correlation_id"] = marks["correlation_id"]
            text = json.dumps(env)
            pieces = []
            for slot in self._SLOTS:  # the order the slots appear in the text (the envelope's key order)
                before, text = text.split(json.dumps(marks[slot]))
                pieces.append(before)
            parts = self._templates[key] = (*pieces, text)
        return parts

    def send(self, name: str, args: list[Any]) -> None:
        """LPUSH the message on a connection kept by the process; on a connection error, through the client (its retries).

        The client's command path (its pool, retry and timing layers) cost a submit
        more CPU than the push itself (~80 µs of ~120 in a gunicorn-like request).
        """
        import redis

        message = self.message(name, args)
        conn = self._take()
        try:
            conn.send_packed_command(conn.pack_command("LPUSH", self.queue, message))
            conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError):  # dropped (a Redis restart): the client's way, which retries
            conn.disconnect()  # the next use of it connects again
            self.client.lpush(self.queue, message)
        finally:
            self._idle.append(conn)

    def _take(self):
        """A connection not in use, the last used first, or a new one made with the client's settings.

        The connections belong to the process, not to a thread: a request may run on a thread or greenlet that ends
        with it (werkzeug's threads, gunicorn's gevent workers), and one connection each would pile up. As many are
        kept as sent at once. A forked child makes its own.
        """
        if self._idle_pid != os.getpid():
            self._idle, self._idle_pid = [], os.getpid()
        try:
            return self._idle.pop()  # atomic: no lock
        except IndexError:
            return self.client.connection_pool.make_connection()

    def client_id(self) -> int:
        """Redis's id of the connection ``send`` uses next (tests drop it)."""
        conn = self._take()
        try:
            conn.send_command("CLIENT", "ID")
            return conn.read_response()
        finally:
            self._idle.append(conn)
