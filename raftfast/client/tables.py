"""Text tables for the commands (status, member, bench, compare): aligned columns."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table"]


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = ""
) -> list[str]:
    """Aligned text lines; ``align`` has a character per column, ``<`` (the default for the
    columns it does not cover) or ``>``."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(_width(row[i]) for row in cells if i < len(row)) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - _width(cell))
            parts.append(pad + cell if align[i : i + 1] == ">" else cell + pad)
        lines.append("  ".join(parts).rstrip())
    return lines


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal: node ids may be any printable text, and a wide
    (CJK) or combining character is not one column (the rows of ``status`` went askew)."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )
