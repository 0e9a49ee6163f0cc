"""Plain-text tables for terminal output (Markdown tables are report.py's)."""
from __future__ import annotations


def format_table(head: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """`head` and `rows` (lists of cells) as aligned columns under a rule of dashes; column indices in `right`
    are right-aligned. E.g. format_table(["a", "n"], [["x", "10"]], right={1}) → "a   n\\n-  --\\nx  10"."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
