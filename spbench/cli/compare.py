"""`spbench compare [--impl spbench,...] [--suite ci]`: SP implementations through the same parity harness.

Each implementation (spbench/compare/adapters.py) trains every case of the suite its own way on the suite's ranks,
against the same SP-off reference and tolerances; each case gets a verdict: pass, wrong (the error size, or a hang)
or refused (the implementation's own reason). Results JSON (with every adapter's package versions) and report.md
go to --out (default out/compare). Exit 0 when every case ran to a verdict, whatever the verdicts.
--merge combines the compare.json of several runs (each suite, each venv) into one document and report, keeping
each run's provenance; it runs nothing. Both add each implementation's estimated max length (compare/memory.toml).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..common.errors import UsageError, need_positive
from ..common.results import provenance, writable_folder, write_json_atomic

EPILOG = """examples:
  spbench compare                          # every adapter on the ci suite, results in out/compare
  spbench compare --impl spbench --case sft-ulysses-sp2,packed-sft-zigzag-sp4
  spbench compare --merge main=out/ci/compare.json swift=out/swift/compare.json --out reports/compare
  spbench compare --merge main=out/ci/compare.json --trace-memory --out reports/compare   # + traced max lengths
  spbench compare --merge reports/compare/compare.json --trace-memory --out reports/compare   # merge a report again
"""


def add_arguments(p) -> None:
    p.add_argument("--impl", help="comma-separated implementations (default: every adapter; see --list)")
    p.add_argument("--list", action="store_true", help="list the implementations and exit")
    p.add_argument("--suite", default="ci", help="shipped suite name or a .toml path (default ci)")
    p.add_argument("--case", metavar="NAME[,NAME...]", help="run only these cases of the suite")
    p.add_argument("--out", default="out/compare", help="results JSON and report.md go here (default out/compare)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a case's ranks are killed")
    p.add_argument("--merge", nargs="+", metavar="[LABEL=]compare.json",
                   help="merge these runs' documents into one (in order; LABEL names a run, default its folder) "
                        "instead of running anything; a merged document counts as the runs it holds")
    p.add_argument("--trace-memory", nargs="?", const="all", metavar="IMPL,...",
                   help="also trace the max length on 8 x 80 GB of each implementation (or the ones named) whose step "
                        "runs on fake tensors (spbench, deepspeed-alst, deepspeed-alst-attention, hf-accelerate-sp; "
                        "ms-swift, verl in their venvs, a merge carries their rows; no checkpoint offload; minutes "
                        "each: compare/traced.py)")
    p.add_argument("--baseline-out", metavar="FILE", help="also write the verdicts alone (rows without metrics) "
                   "as a `spbench gate` baseline, e.g. spbench/suites/golden/compare.json")


def run(args) -> int:
    if args.baseline_out:  # checked before hours of cases, not after
        writable_folder(Path(args.baseline_out).resolve().parent, "--baseline-out")
    if args.trace_memory and args.trace_memory != "all":
        from ..compare.traced import TRACERS

        unknown = sorted(set(args.trace_memory.split(",")) - set(TRACERS))
        if unknown:
            raise UsageError(f"--trace-memory {','.join(unknown)}: the traceable implementations are "
                             f"{', '.join(TRACERS)} (or give --trace-memory alone for all)")
    if args.merge:
        return _merge(args)
    from ..check.cases import load_suite, select
    from ..compare.registry import implementations
    from ..compare.report import compare_doc

    need_positive(timeout=args.timeout)
    IMPLEMENTATIONS = implementations()
    if args.list:
        for name, impl in IMPLEMENTATIONS.items():
            print(f"{name:16} {', '.join(impl.packages)}")
        return 0
    names = args.impl.split(",") if args.impl else list(IMPLEMENTATIONS)
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown:
        raise UsageError(f"--impl {','.join(unknown)}: unknown; `spbench compare --list` shows {', '.join(IMPLEMENTATIONS)}")
    suite, cases = load_suite(args.suite)
    cases = select(cases, args.case) if args.case else cases
    out = writable_folder(args.out, "--out")
    (out / "compare.json").unlink(missing_ok=True)  # present means complete
    from ..compare.run import compare

    t0 = time.perf_counter()
    impls = [IMPLEMENTATIONS[n] for n in names]
    rows = compare(impls, cases, log=lambda m: print(m, file=sys.stderr), timeout=args.timeout)
    prov = provenance(" ".join(["spbench", *sys.argv[1:]]), "gloo", max(c.world for c in cases), 0,
                      time.perf_counter() - t0)
    doc = compare_doc(suite, impls, rows, prov)
    return _write(doc, out, args.baseline_out, args.trace_memory)


def _merge(args) -> int:
    from ..common.results import load_results
    from ..common.schemas import COMPARE
    from ..compare.merge import merge, parse_input

    inputs = [(label, path, load_results(path, (COMPARE,))) for label, path in map(parse_input, args.merge)]
    out = writable_folder(args.out, "--out")
    (out / "compare.json").unlink(missing_ok=True)
    world = max((doc["provenance"].get("world") or 0 for _, _, doc in inputs), default=0)
    doc = merge(inputs, provenance(" ".join(["spbench", *sys.argv[1:]]), "gloo", world, 0))
    return _write(doc, out, args.baseline_out, args.trace_memory)


def _write(doc: dict, out, baseline_out: str | None, trace_memory: str | None = None) -> int:
    """The document with its max-length estimates (and traces), its report.md and PNG, compare.json last (present =
    complete); the gate baseline of its verdicts to `baseline_out`."""
    from ..compare.estimate import estimates
    from ..compare.gate import baseline_of
    from ..compare.report import write_report

    doc["maxlen_estimates"] = estimates(doc["implementations"])
    if trace_memory:
        from ..compare.traced import traced_rows

        only = None if trace_memory == "all" else set(trace_memory.split(","))
        doc["maxlen_traced"] = traced_rows(doc["implementations"], doc.get("maxlen_traced"), only)
    written = write_report(doc, out)
    if baseline_out:
        write_json_atomic(baseline_out, baseline_of(doc))
        written.append(baseline_out)
    write_json_atomic(out / "compare.json", doc)
    print(f"compare: {len(doc['rows'])} verdicts; {out / 'compare.json'}, " + ", ".join(map(str, written)))
    return 0
