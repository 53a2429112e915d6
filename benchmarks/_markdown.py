"""Markdown tables, the one way the benchmark reports write them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["table"]


def table(
    header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
) -> list[str]:
    """The lines of a Markdown table: header, separator, one line per row.

    :param header: the column titles.
    :param rows: the cells of every row, one per column (written with ``str``).
    :param align: one letter per column, ``l`` (left) or ``r`` (right); default all left.
    """
    align = align if align is not None else "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must be one of 'l'/'r' per column ({len(header)}), got {align!r}")
    lines = [_line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        cells = [str(cell) for cell in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append(_line(cells))
    return lines


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
