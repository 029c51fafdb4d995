"""The prefix-cache benchmark's pure logic: the A B B A block order and the table with its on/off ratios."""

from __future__ import annotations

from loadtests.bench_prefix_cache import WORKLOADS, Figures, Result, Sample, abba, report


def test_blocks_alternate_on_off_off_on() -> None:
    assert abba(2) == [True, False, False, True] * 2


def test_the_table_gives_each_server_and_the_ratios() -> None:
    def figures(ttft: float, seconds: float) -> Figures:
        return Figures([Sample(ttft * (1 + i / 10), 10) for i in range(10)], seconds)

    result = Result(
        {
            (workload, on): figures(0.1 if on else 0.4, 5.0 if on else 10.0)
            for workload in WORKLOADS
            for on in (True, False)
        },
        {"shared": (690.0, 1000.0), "unique": (0.0, 1000.0)},
    )
    text = report(result)
    assert "| shared | on | 10 | 20.0 |" in text and "| shared | off | 10 | 10.0 |" in text
    assert "690 / 1000 (69%)" in text and "0 / 1000 (0%)" in text
    assert "shared: throughput on/off 2.000x, p50 TTFT on/off 0.250x" in text


def test_the_table_gives_only_the_workloads_that_ran() -> None:
    figures = Figures([Sample(0.1, 10)] * 10, 1.0)
    result = Result({("unique", on): figures for on in (True, False)}, {"unique": (0.0, 1000.0)})
    text = report(result)
    assert "| unique | on |" in text and "unique: throughput on/off 1.000x" in text
    assert "shared" not in text
