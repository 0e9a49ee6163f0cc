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


def strategy_label(row: dict) -> str:
    """The SP strategy of a max-length row, with its degrees where it has two: "hybrid u4×r2", "ulysses"."""
    method = str(row.get("sp_method", "?"))
    return f"{method} u{row['ulysses']}×r{row['ring']}" if method == "hybrid" and "ulysses" in row else method
