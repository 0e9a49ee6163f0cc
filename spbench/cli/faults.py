"""`spbench faults`: inject every known SP bug (../shared/FAULTS.md) and show which check catches it.

Each fault is swapped into the SP ranks only (the reference stays clean); it is caught when one of its checks
fails. Exit 0 only if every fault is caught and the clean runtime passes every check.
"""
from __future__ import annotations

import json
import sys

from ..common.errors import UsageError
from ..common.results import provenance, write_json_atomic

EPILOG = """examples:
  spbench faults
  spbench faults --only F3,F10 --json
"""


def add_arguments(p) -> None:
    p.add_argument("--only", default="", help="comma-separated fault ids (default: all)")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    p.add_argument("--json", action="store_true", help="print the JSON document as the last stdout line")


def run(args) -> int:
    from ..faults.catalogue import FAULTS, catalogue

    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - {f.id for f in FAULTS})
    if unknown:
        raise UsageError(f"unknown fault id(s) {unknown}; known: {', '.join(f.id for f in FAULTS)}")
    doc = catalogue(only)
    n = sum(r["caught"] for r in doc["faults"])
    print(f"faults: {n}/{len(doc['faults'])} caught; clean runtime {'passes' if doc['clean_passed'] else 'FAILS'} every check")
    if args.out:
        write_json_atomic(args.out, {**doc, "provenance": provenance(" ".join(["spbench", *sys.argv[1:]]), "gloo", 4, 0)})
    if args.json:
        print(json.dumps({"faults": doc["faults"], "passed": doc["passed"]}))
    return 0 if doc["passed"] else 1
