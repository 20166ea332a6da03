"""The version of raftfast: written here only (pyproject.toml reads it, statically)."""

from __future__ import annotations

__version__ = "0.1.0"


def version_text(prog: str) -> str:
    """What ``--version`` prints: ``raftfast 0.1.0 (compiled)`` or ``(pure Python)``."""
    from raftfast._accel import COMPILED

    return f"{prog} {__version__} ({'compiled' if COMPILED else 'pure Python'})"
