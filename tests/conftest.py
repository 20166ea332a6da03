"""Shared pytest fixtures."""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest

# -- hot-path implementations (compiled Cython modules and their pure-Python twins) -------------

PURE_ONLY = bool(os.environ.get("RAFTFAST_PUREPYTHON"))


def load_impl(kind: str) -> SimpleNamespace:
    """Return ``SimpleNamespace(name, log, batch)`` for "compiled" or "pure".

    A missing compiled build is an error, not a skip, unless RAFTFAST_PUREPYTHON is set: a
    silently skipped compiled run would hide a broken build.
    """
    if kind == "pure":
        return SimpleNamespace(
            name="pure",
            log=importlib.import_module("raftfast._log_py"),
            batch=importlib.import_module("raftfast._batch_py"),
        )
    if PURE_ONLY:
        pytest.skip("RAFTFAST_PUREPYTHON is set: only the pure-Python twins are tested")
    try:
        log = importlib.import_module("raftfast._log")
        batch = importlib.import_module("raftfast._batch")
    except ImportError as exc:
        pytest.fail(
            f"compiled modules missing ({exc}); build them with `make build` or set "
            "RAFTFAST_PUREPYTHON=1 to test only the pure-Python twins",
            pytrace=False,
        )
    return SimpleNamespace(name="compiled", log=log, batch=batch)


# With RAFTFAST_PUREPYTHON set there is nothing compiled to test: only the pure twins run.
@pytest.fixture(params=["pure"] if PURE_ONLY else ["compiled", "pure"])
def impls(request: pytest.FixtureRequest) -> SimpleNamespace:
    """The (log, batch) module pair of one implementation; every test runs against both."""
    return load_impl(request.param)
