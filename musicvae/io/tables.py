"""Markdown tables: the one writer behind every report (evaluate, benchmarks, comparisons)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a GitHub-flavoured markdown table; cells are written with `str`.

    Args:
        header: column titles.
        rows: one sequence of cells per row, as many as `header`.

    Returns:
        The header line, the rule line and one line per row, without newlines.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(cell) for cell in row]
        if len(cells) != len(header):
            raise ValueError(f"markdown_table: a row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
