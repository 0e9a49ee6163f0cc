"""`spbench report`: report.md with tables and PNG plots from parity, max-length, GPU-check and comparison files.

Parity files (spbench.results/1) give one table per suite, its failures, a loss-curve overlay per
(stage, method) with SP off vs every SP size, and a relative-loss-error-per-step plot. Max-length
files (spbench.maxlen/1) give a model × stage × SP → max length table. GPU-check files
(spbench.gpu-check/1) give one row per step (peak vs the memory model's prediction, tokens/s, MB per
token) and ours vs plain against issue 5's goals. Comparison files (spbench.compare/1, `spbench compare`) give
their verdict, timing, feature and published-figures tables. Each file's provenance follows. Imports no torch
for parity and max-length files.
"""
from __future__ import annotations

EPILOG = """examples:
  spbench report out/parity/ci.json --out out/report
  spbench report reports/parity/ci.json reports/maxlen/maxlen.json --out reports/all
"""


def add_arguments(p) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS.json",
                   help="parity (spbench.results/1), max-length (spbench.maxlen/1) or gpu-check "
                        "(spbench.gpu-check/1) results files, or comparison documents (spbench.compare/1)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the PNGs (created)")


def run(args) -> int:
    from ..report import render

    path = render(args.results, args.out)
    print(f"report: wrote {path}")
    return 0
