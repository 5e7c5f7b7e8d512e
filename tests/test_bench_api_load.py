"""The load bench's arithmetic (bench/api_load.py): what it reads from wrk and how slices beside the ceiling make a ratio."""

import pytest

from bench.api_load import paired, parse_wrk

WRK_OUT = """Running 4s test @ http://127.0.0.1:40000/v1/jobs
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    20.38ms    9.20ms 118.51ms   80.11%
    Req/Sec   802.97    175.58     1.30k    71.25%
  Latency Distribution
     50%   18.90ms
     75%   24.10ms
     90%   31.02ms
     99%   61.70ms
  6415 requests in 4.02s, 6.91MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   1595.77
Transfer/sec:      1.72MB
"""


def test_parse_wrk_reads_requests_seconds_p99_and_failures():
    got = parse_wrk(WRK_OUT)
    assert got["requests"] == 6415 and got["seconds"] == pytest.approx(4.02)
    assert got["rps"] == pytest.approx(1595.77) and got["p99_ms"] == pytest.approx(61.70)
    assert got["non_2xx"] == 3 and got["socket_errors"] == ""
    assert parse_wrk(WRK_OUT.replace("99%   61.70ms", "99%    1.20s"))["p99_ms"] == pytest.approx(1200.0)


def _slice(requests: int, seconds: float, p99: float = 10.0, bad: int = 0) -> dict:
    return {"requests": requests, "seconds": seconds, "rps": requests / seconds, "p99_ms": p99, "non_2xx": bad}


def test_paired_ratio_is_requests_a_second_over_the_ceilings_in_the_same_slices():
    """A machine that slows for the second pair slows both sides: the ratio stays what each pair says (0.25), where
    the endpoint's rate over both against the ceiling's first, faster slice alone would say 0.19."""
    ceiling = [_slice(32_000, 4.0), _slice(16_000, 4.0)]
    endpoint = [_slice(8_000, 4.0, p99=30.0), _slice(4_000, 4.0, p99=80.0, bad=2)]
    got = paired(ceiling, endpoint)
    assert got["ratio"] == pytest.approx(0.25)
    assert got["rps"] == pytest.approx(1_500.0) and got["ceiling_rps"] == pytest.approx(6_000.0)
    assert got["p99_ms"] == 80.0 and got["non_2xx"] == 2  # the worst slice's p99; every slice's failures
    assert got["slices"] == [2_000.0, 1_000.0] and got["ceiling_slices"] == [8_000.0, 4_000.0]


def test_paired_weighs_slices_by_their_measured_seconds():
    """wrk's runs last a little longer than asked: rates come from requests over measured seconds, not averaged rates."""
    got = paired([_slice(4_000, 1.0)], [_slice(1_000, 1.0), _slice(3_000, 2.0)])
    assert got["rps"] == pytest.approx(4_000 / 3.0)
    assert got["ratio"] == pytest.approx((4_000 / 3.0) / 4_000)


class _Slow:
    """A keep-alive HTTP/1.1 server on a thread a connection: each answer after ``delay`` seconds, every ``bad``-th a 500."""

    def __init__(self, delay: float, bad: int = 0):
        import http.server
        import itertools
        import threading

        count = itertools.count(1)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                import time

                time.sleep(delay)
                n = next(count)
                body = b'{"n": %d}' % n
                self.send_response(500 if bad and n % bad == 0 else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def work(tmp_path):
    from bench.api_load import openloop_binary

    if openloop_binary(tmp_path) is None:
        pytest.skip("no C compiler to build bench/openloop.c")
    return tmp_path


def test_the_held_client_counts_from_each_requests_due_time_so_a_slow_server_is_charged_for_the_queue(work):
    """bench/openloop.c holds a rate open-loop: 40 requests a second for 1.5 s at a server answering in 100 ms. With 8
    connections (room for the 4 in flight) each takes ~100 ms from its due time. With 2 connections the server can
    answer only 20 a second: the requests wait for a free connection, and each is charged from when it was due, so
    the latencies grow past the server's 100 ms to most of a second (a closed-loop client, as wrk, would report
    100 ms). Every 5th answer a 500: failures counted."""
    from bench.api_load import HELD_CONNECTIONS, open_loop
    import bench.api_load as load

    slow = _Slow(0.1, bad=5)
    try:
        enough = open_loop(slow.port, "GET", "/x", None, {}, rate=40, seconds=1.5, work=work)
        load.HELD_CONNECTIONS = 2
        try:
            starved = open_loop(slow.port, "GET", "/x", None, {}, rate=40, seconds=1.5, work=work)
        finally:
            load.HELD_CONNECTIONS = HELD_CONNECTIONS
    finally:
        slow.close()
    assert enough["client"] == "C" and enough["requests"] == 60 and enough["failures"] == 12
    assert 95 <= enough["p50_ms"] <= 150 and enough["p99_ms"] < 250 and enough["client_lag_p50_ms"] < 5
    assert starved["requests"] == 60 and starved["failures"] == 12
    assert starved["p99_ms"] > 1000 and starved["p50_ms"] > 400  # 60 requests at 20 a second: the last done ~3 s in, due at 1.5 s
    assert starved["client_lag_p50_ms"] > 100  # sent late: waiting for a connection, which the server held
