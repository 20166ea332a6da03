"""bench/disk_sync.py: the disk's sync latency that ``make compare`` prints above its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import disk_sync
import pytest

HERE = Path(__file__).resolve().parent


def test_sync_latency_reports_ordered_percentiles_and_leaves_no_file(tmp_path: Path) -> None:
    result = disk_sync.sync_latency(str(tmp_path), gap_ms=0.5, count=20)
    assert set(result) == {"p50_ms", "p90_ms", "p99_ms"}
    assert 0 <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]  # (~0 on a tmpfs)
    assert list(tmp_path.iterdir()) == []


def test_measure_names_each_gap(tmp_path: Path) -> None:
    results = disk_sync.measure(str(tmp_path), [0, 1.5], count=3)
    assert list(results) == ["gap 0 ms", "gap 1.5 ms"]
    assert "gap 1.5 ms: p50" in disk_sync.summary(results)


@pytest.mark.parametrize(("count", "gap"), [(0, 0.0), (5, -1.0)])
def test_bad_arguments_are_refused(tmp_path: Path, count: int, gap: float) -> None:
    with pytest.raises(ValueError):
        disk_sync.sync_latency(str(tmp_path), gap, count)


@pytest.mark.parametrize("args", [["--dir", "/nonexistent/raftfast"], ["--gaps", "x"]])
def test_cli_says_what_is_wrong_and_exits_2(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(HERE / "disk_sync.py"), "--count", "2", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("disk_sync: ") and "Traceback" not in done.stderr
