"""/metrics an operator can trust: sums over gunicorn workers, bounded labels."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests

from api.metrics import METHODS, UNMATCHED
from tests.api.test_service import _parse_metrics
from tests.conftest import REDIS_URL
from tests.support.compose import ComposeStack

N = 48


def _series(text: str, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in _parse_metrics(text).items() if n == name}


@pytest.mark.slow
def test_counts_are_summed_over_two_gunicorn_workers(pg_url, tmp_path):
    """gunicorn as compose starts it (2 workers x 8 threads); requests arrive concurrently on fresh connections.

    Half find a job (answered before Flask, api/fastpath.py), half do not (answered by Flask's view): both counted.
    """
    from storage import jobs as job_store
    from storage import teams as team_store
    from storage.db import Database

    prom = tmp_path / "prom"
    broker = REDIS_URL.rsplit("/", 1)[0] + "/12"
    with ComposeStack(tmp_path, database_url=pg_url, broker_url=broker, s3_url="http://127.0.0.1:9",
                      QUANTFARM_STORE="local", PROMETHEUS_MULTIPROC_DIR=str(prom)) as stack:
        (prom / "counter_999999.db").parent.mkdir(parents=True, exist_ok=True)
        (prom / "counter_999999.db").write_bytes(b"stale")  # from an earlier run: must be wiped at start
        stack.start("api")
        stack.wait_healthy()
        assert not (prom / "counter_999999.db").exists()
        auth = {"Authorization": f"Bearer {stack.first_admin_key()}", "Connection": "close"}
        missing = f"job_{uuid.uuid4().hex[:26]}"
        db = Database(pg_url)
        with db.session() as s:
            team_store.ensure_default_team(s)
            found = job_store.create_job(s, method="rtn", model_ref="local:/m", spec={}, secrets={}).id
        db.dispose()
        codes: list[int] = []

        def hit(n: int) -> None:
            for i in range(n):
                codes.append(requests.get(f"{stack.url}/v1/jobs/{(missing, found)[i % 2]}", headers=auth, timeout=30).status_code)

        def per_worker() -> dict[str, float]:
            """This route's 404 count in each worker's own file."""
            from prometheus_client.mmap_dict import MmapedDict

            out = {}
            for path in prom.glob("counter_*.db"):
                for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
                    if "quantfarm_http_requests" in key and "/v1/jobs/<job_id>" in key and '"404"' in key:
                        out[path.name] = out.get(path.name, 0) + value
            return out

        def workers_seen() -> set[str]:
            return {name for name, v in per_worker().items() if v > 0}

        while len(workers_seen()) < 2 or len(codes) < N:  # batches of concurrent requests until both workers served some
            assert len(codes) < 50 * N, f"the requests never reached both workers: {workers_seen()}"
            threads = [threading.Thread(target=hit, args=(4,)) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        n = len(codes)
        assert sorted(set(codes)) == [200, 404] and codes.count(200) == codes.count(404) == n // 2
        deadline = time.monotonic() + 10  # each worker writes its counts every FLUSH_SECONDS
        while sum(per_worker().values()) < n // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(per_worker().values()) == n // 2
        for _ in range(4):  # whichever worker answers the scrape, it reports the sum
            text = stack.get("/metrics").text
            got = _series(text, "quantfarm_http_requests_total")
            assert [got[(("code", code), ("method", "GET"), ("route", "/v1/jobs/<job_id>"))] for code in ("200", "404")] == [n // 2] * 2
            buckets = _series(text, "quantfarm_http_request_duration_seconds_count")
            assert buckets[(("method", "GET"), ("route", "/v1/jobs/<job_id>"))] == n


def test_labels_stay_bounded_whatever_clients_send(lite):
    client = lite.test_client()
    for i in range(30):
        client.open(f"/v1/jobs/{uuid.uuid4().hex}", method=f"BREW{i}")
        client.get(f"/random/{uuid.uuid4().hex}?x={i}")
        client.open("/v1/jobs", method="PROPFIND")
    text = client.get("/metrics").get_data(as_text=True)
    series = _series(text, "quantfarm_http_requests_total")
    rules = {r.rule for r in lite.url_map.iter_rules()} | {UNMATCHED}
    for labels in series:
        d = dict(labels)
        assert d["method"] in METHODS | {"other"}, d
        assert d["route"] in rules, d
    assert series[(("code", "405"), ("method", "other"), ("route", UNMATCHED))] == 60
    assert series[(("code", "404"), ("method", "GET"), ("route", UNMATCHED))] == 30
    assert len(series) <= 4  # 30 odd methods and 30 random URLs made no new series


def test_farm_metrics_count_queue_failures_and_deliveries(lite):
    from storage import jobs as job_store
    from storage.jobs import JobStatus

    db = lite.extensions["quantfarm"].db
    with db.session() as s:
        ids = [job_store.create_job(s, method="rtn", model_ref="m", spec={}, secrets={}, priority=p).id for p in (0, 0, 5, 5, 5)]
    for job_id, code in zip(ids[:2], ("oom", "oom")):
        with db.session() as s:
            job_store.claim(s, job_id, "w", 60)
        with db.session() as s:
            job_store.transition(s, job_store.get_job(s, job_id), JobStatus.FAILED, error_code=code, error_message="x")
    with db.session() as s:
        job_store.claim(s, ids[2], "w", 60)
    text = lite.test_client().get("/metrics").get_data(as_text=True)
    depth = {dict(k)["priority"]: v for k, v in _series(text, "quantfarm_queue_depth").items()}
    assert depth == {"5": 2}
    assert _series(text, "quantfarm_running_jobs") == {(("method", "rtn"),): 1}
    assert _series(text, "quantfarm_job_failures_total") == {(("error_code", "oom"),): 2}
    assert _series(text, "quantfarm_webhook_deliveries") == {(("status", s),): 0 for s in ("pending", "delivered", "failed", "disabled")}


def test_deferred_counts_reach_the_same_sums_and_buckets():
    """Under gunicorn a worker's requests are counted in memory and written to the shared files at a flush: the
    exposition then equals counting each request as it ends (every bucket's edge included), and nothing before."""
    from prometheus_client import generate_latest

    from api.metrics import SECONDS_BUCKETS, HttpMetrics

    direct, deferred = HttpMetrics(), HttpMetrics()
    direct.deferred, deferred.deferred = False, True
    seconds = [0.0, *SECONDS_BUCKETS, *(b * 1.01 for b in SECONDS_BUCKETS), 0.0001, 42.0]
    for i, sec in enumerate(seconds):
        for m in (direct, deferred):
            m.observe("/v1/jobs/<job_id>", "GET" if i % 3 else "BREW", 200 if i % 2 else 404, sec)
    assert "quantfarm_http_requests_total{" not in generate_latest(deferred.registry).decode()
    deferred.flush()
    got, want = (_parse_metrics(generate_latest(m.registry).decode()) for m in (deferred, direct))
    assert got.keys() == want.keys() and len(want) > 30
    for key, value in want.items():  # counts and buckets exactly; a sum added once differs in its last bits at most
        assert got[key] == pytest.approx(value, rel=1e-12) if key[0].endswith("_sum") else got[key] == value, key
    assert deferred._flusher is not None and deferred._flusher.is_alive()  # writes on its own every FLUSH_SECONDS
    deferred.observe("/healthz", "GET", 200, 0.001)
    time.sleep(1.5)
    assert 'quantfarm_http_requests_total{code="200",method="GET",route="/healthz"} 1.0' in generate_latest(deferred.registry).decode()
