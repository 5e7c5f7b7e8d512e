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
