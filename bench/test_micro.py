"""Micro benchmarks: compiled hot paths vs their pure-Python twins.

    pytest bench --benchmark-only --benchmark-group-by=group   # side-by-side pairs
    pytest bench --benchmark-disable -s                        # just the speedup gate, with ratios

``test_speedup_floor`` measures compiled/pure ratios itself (timeit medians) so it also runs
under ``--benchmark-disable`` in ``make test``. There its floor (3x) is far below the target we
report (>= 10x; ``commit_index`` 9-11x) because shared CI machines are noisy, and a function
under it is measured again, up to three times; ``make bench`` holds 8x (``tests/gates.py``).
"""

from __future__ import annotations

import importlib
import os
import statistics
import timeit
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from tests.gates import best_of, limit

N_ENTRIES = 1000
PAYLOAD = 64
CRC_BYTES = 64 * 1024


def load(kind: str) -> SimpleNamespace:
    """(log, batch) modules of one implementation; a missing build fails unless pure-only."""
    if kind == "pure":
        return SimpleNamespace(
            log=importlib.import_module("raftfast._log_py"),
            batch=importlib.import_module("raftfast._batch_py"),
        )
    if os.environ.get("RAFTFAST_PUREPYTHON"):
        pytest.skip("RAFTFAST_PUREPYTHON is set: no compiled modules to benchmark")
    try:
        return SimpleNamespace(
            log=importlib.import_module("raftfast._log"),
            batch=importlib.import_module("raftfast._batch"),
        )
    except ImportError as exc:
        pytest.fail(f"compiled modules missing ({exc}); run `make build`", pytrace=False)


def workloads(impl: SimpleNamespace) -> dict[str, tuple[Callable[..., object], tuple]]:
    """``name -> (function, args)`` per hot function, with the inputs prepared up front.

    Calling the function directly (not through a lambda) keeps call overhead out of the
    comparison as far as possible; it matters for the nanosecond-scale commit_index.
    """
    payloads = [bytes([i % 256]) * PAYLOAD for i in range(N_ENTRIES)]
    full = impl.log.EntryLog()
    full.append(1, payloads)
    batch = impl.batch.encode_uniform(1, 1, payloads)
    types = [0] * N_ENTRIES
    types[N_ENTRIES // 2] = 2  # one configuration entry in a frame of normal ones
    mixed = impl.batch.encode_batch(1, [1] * N_ENTRIES, payloads, types)
    EntryLog = impl.log.EntryLog  # noqa: N806

    def log_append(term, payloads):
        EntryLog().append(term, payloads)  # a fresh log each time, so memory stays flat

    return {
        "log_append": (log_append, (1, payloads)),
        "log_slice": (full.slice, (1, N_ENTRIES + 1)),
        "batch_encode": (impl.batch.encode_uniform, (1, 1, payloads)),
        "batch_decode": (impl.batch.decode_batch, (batch,)),
        "commit_index": (impl.batch.commit_index, ([17, 12, 19, 12, 15],)),
        "crc32c": (impl.batch.crc32c, (bytes(range(256)) * (CRC_BYTES // 256),)),
        "entries_of_type": (impl.batch.entries_of_type, (mixed, 2)),
    }


FUNCTIONS = [
    "log_append",
    "log_slice",
    "batch_encode",
    "batch_decode",
    "commit_index",
    "crc32c",
    "entries_of_type",
]


def _bench(benchmark, impl: str, name: str) -> None:
    fn, args = workloads(load(impl))[name]
    benchmark.group = name
    benchmark.extra_info["impl"] = impl
    benchmark(fn, *args)


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_log_append(benchmark, impl):
    _bench(benchmark, impl, "log_append")


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_log_slice(benchmark, impl):
    _bench(benchmark, impl, "log_slice")


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_batch_encode(benchmark, impl):
    _bench(benchmark, impl, "batch_encode")


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_batch_decode(benchmark, impl):
    _bench(benchmark, impl, "batch_decode")


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_commit_index(benchmark, impl):
    _bench(benchmark, impl, "commit_index")


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_crc32c(benchmark, impl):
    _bench(benchmark, impl, "crc32c")


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_entries_of_type(benchmark, impl):
    _bench(benchmark, impl, "entries_of_type")


# -- speedup gate (no benchmark fixture: runs under --benchmark-disable) ----------------------


def _per_call(
    fn: Callable[..., object], args: tuple, repeats: int = 7, budget: float = 0.004
) -> float:
    """Median seconds per call over ``repeats`` timed loops of about ``budget`` seconds each."""
    env = {f"a{i}": arg for i, arg in enumerate(args)}
    timer = timeit.Timer(f"fn({', '.join(env)})", globals={"fn": fn, **env})
    number = 1
    while True:  # calibrate the loop length
        elapsed = timer.timeit(number)
        if elapsed >= budget or number >= 1 << 20:
            break
        number *= max(2, min(100, int(budget / max(elapsed, 1e-9)) + 1))
    return statistics.median(timer.repeat(repeats, number)) / number


def test_speedup_floor():
    compiled = workloads(load("compiled"))
    pure = workloads(load("pure"))
    floor = limit(test=3.0, bench=8.0)
    ratios = {}
    for name in FUNCTIONS:
        c, p = best_of(
            3,
            lambda: (_per_call(*compiled[name]), _per_call(*pure[name])),  # noqa: B023
            lambda cp: cp[1] / cp[0],
            floor,
        )
        ratios[name] = p / c
        print(
            f"{name:>13}: compiled {c * 1e6:9.2f} us  pure {p * 1e6:10.2f} us  ratio {p / c:7.1f}x"
        )
    slow = {name: round(r, 1) for name, r in ratios.items() if r < floor}
    assert not slow, f"compiled not {floor}x faster than pure: {slow}"
