"""etcd's fixed errors are made anew at each use: one exception object raised again and
again keeps every traceback it was raised with, and each holds its frames and their requests
(600 refused 2 MiB Puts took a node to 1.3 GB: a hunt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raftfast.etcd import errors
from raftfast.etcd.errors import EtcdError

ROOT = Path(__file__).resolve().parents[2]


def test_each_use_is_a_new_error_and_its_traceback_its_own():
    first, second = errors.EMPTY_KEY, errors.EMPTY_KEY
    assert first is not second and first == second and first.message.endswith("not provided")
    for _ in range(5):
        with pytest.raises(EtcdError) as raised:
            raise errors.EMPTY_KEY
        depth = 0
        tb = raised.value.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        assert depth == 1  # (this frame alone: no earlier raise's)
    assert "EMPTY_KEY" in dir(errors)
    with pytest.raises(AttributeError):
        errors.EMTPY_KEY  # noqa: B018 - (a typo is an error, not a new kind)


def test_no_module_binds_one_of_them_for_good():
    # (``from raftfast.etcd.errors import EMPTY_KEY`` would bind one object, raised again
    # and again)
    imports = re.compile(r"from raftfast\.etcd\.errors import ([^\n]+)")
    for path in (ROOT / "raftfast").rglob("*.py"):
        for names in imports.findall(path.read_text()):
            assert not re.search(r"\b[A-Z][A-Z_]+\b", names), f"{path}: {names}"
