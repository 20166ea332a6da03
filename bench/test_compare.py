"""bench/compare.py: the medians ``make compare`` reports when it measures in rounds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import compare
import pytest

HERE = Path(__file__).resolve().parent


def _run(ops: float, p50: float, p99: float, errors: int = 0, first_error: str = "") -> dict:
    return {
        "ops_per_s": ops,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": 10,
        "errors": errors,
        "first_error": first_error,
        "cpu_percent": {"n1": ops / 10},
        "latency_cdf": [[p50, 0.5]],
    }


def test_the_median_of_three_rounds_takes_each_figure_by_itself() -> None:
    runs = [_run(900, 0.9, 9.0), _run(300, 0.5, 3.0), _run(600, 2.0, 5.0)]
    result = compare.median_result(runs)
    assert result["ops_per_s"] == 600  # the median rate, and its round's CPU...
    assert result["cpu_percent"] == {"n1": 60}
    assert result["p50_ms"] == 0.9  # ...but the median p50 and p99 of all three
    assert result["p99_ms"] == 5.0
    assert result["requests"] == 30  # (counts: all the rounds')
    assert "latency_cdf" not in result  # (one round's would not match the medians)
    assert result["rounds"] == 3
    assert result["rounds_ops_per_s"] == [900, 300, 600]  # every round, in order
    assert result["rounds_p50_ms"] == [0.9, 0.5, 2.0]
    assert runs[2]["p50_ms"] == 2.0  # (the runs themselves are left as they were)


def test_an_even_number_of_rounds_takes_the_less_flattering_middle() -> None:
    runs = [_run(400, 1.0, 4.0), _run(100, 3.0, 9.0), _run(300, 2.0, 5.0), _run(200, 4.0, 6.0)]
    result = compare.median_result(runs)
    # (the lower of the two middle rates, the higher of the two middle latencies)
    assert (result["ops_per_s"], result["p50_ms"], result["p99_ms"]) == (200, 3.0, 6.0)


def test_one_round_is_itself() -> None:
    alone = _run(123, 0.4, 1.2)
    expected = {k: v for k, v in alone.items() if k != "latency_cdf"}
    assert compare.median_result([alone]) == {
        **expected,
        "rounds": 1,
        "rounds_ops_per_s": [123],
        "rounds_p50_ms": [0.4],
    }


def test_errors_of_every_round_are_kept() -> None:
    runs = [_run(500, 1.0, 2.0), _run(100, 1.0, 2.0, 3, "UNAVAILABLE: x"), _run(300, 1, 2, 1, "y")]
    result = compare.median_result(runs)
    assert result["errors"] == 4  # (the median run had one: the slow round's are not hidden)
    assert result["first_error"] == "UNAVAILABLE: x"


def test_medians_keep_the_systems_and_workloads() -> None:
    runs = {
        "raftfast": {"sequential": [_run(2, 0.2, 1.0), _run(1, 0.1, 1.0), _run(3, 0.3, 1.0)]},
        "etcd": {"sequential": [_run(5, 0.5, 1.0)]},
    }
    result = compare.medians(runs)
    assert list(result) == ["raftfast", "etcd"]
    assert result["raftfast"]["sequential"]["ops_per_s"] == 2
    assert result["etcd"]["sequential"]["p50_ms"] == 0.5
    with pytest.raises(ValueError):
        compare.median_result([])


def test_rounds_below_one_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(HERE / "compare.py"), "--rounds", "0", "--systems", "pysyncobj"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--rounds: at least 1" in done.stderr
