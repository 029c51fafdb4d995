"""The HTTP-vs-gRPC benchmark's pure logic: the ABBA block order and the per-protocol table with its ratios."""

from __future__ import annotations

from loadtests.bench_http_vs_grpc import Protocol, Sample, abba, report


def test_blocks_alternate_abba_so_each_protocol_gets_half() -> None:
    order = abba(2)
    assert order == [0, 1, 1, 0, 0, 1, 1, 0] and order.count(0) == order.count(1)


def test_the_report_gives_each_protocols_rate_and_percentiles_and_http_over_grpc() -> None:
    grpc = Protocol("gRPC", [Sample(latency=1.0, ttft=0.1, tokens=10)] * 4, seconds=2.0)
    http = Protocol("HTTP", [Sample(latency=2.0, ttft=0.3, tokens=10)] * 4, seconds=4.0)
    lines = report([grpc, http]).splitlines()
    assert lines[2] == "| gRPC | 4 | 20.0 | 1000.0 / 1000.0 | 100.0 / 100.0 |"
    assert lines[3] == "| HTTP | 4 | 10.0 | 2000.0 / 2000.0 | 300.0 / 300.0 |"
    assert lines[4] == "| HTTP ÷ gRPC | | 0.500 | 2.000 / 2.000 | 3.000 / 3.000 |"
