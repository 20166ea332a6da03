"""Every example runs, as its docstring says, and says it worked (exit 0, one JSON line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def test_replicated_counter():
    # three node processes, 1,000 concurrent increments spread over them, one kill -9 half way
    assert run("replicated_counter.py") == {"value": 1000, "expected": 1000, "nodes_agree": True}


def test_lock_service():
    result = run("lock_service.py")
    assert result["ok"] and result["refused_while_held"]
    assert result["bob_waited_s"] >= result["lease_s"] * 0.9


@pytest.mark.parametrize("name", ["ledger.py"])
def test_a_state_machine_served_by_raftfast_node(name):
    assert run(name) == {"alice": 7, "bob": 3}
