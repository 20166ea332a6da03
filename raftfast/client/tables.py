"""Text tables for the commands (status, member, bench, compare): aligned columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table"]


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = ""
) -> list[str]:
    """Aligned text lines; ``align`` has a character per column, ``<`` (the default for the
    columns it does not cover) or ``>``."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if align[i : i + 1] == ">" else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines
