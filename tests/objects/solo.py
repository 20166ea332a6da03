"""A one-member cluster of replicated objects for a test (elected at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import raftfast
from raftfast.tools.localcluster import free_ports


def solo_node(tmp_path: Path, *objects: Any, **named: Any) -> raftfast.Node:
    """A ``Node`` "solo" serving ``raftfast.Objects(*objects, **named)`` (not started)."""
    [port] = free_ports(1)
    return raftfast.Node(
        id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
        state_machine=raftfast.Objects(*objects, **named), tick_ms=20,
    )  # fmt: skip
