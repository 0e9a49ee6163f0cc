"""`spbench parity`: the same training with SP off (reference) and on, compared number by number.

A suite (a TOML shipped in spbench/suites/, or a path) lists cases; list-valued fields expand to the cross
product. The reference runs in this process (SP 1, DP 1, grad accum dp × ga); the SP run on local ranks.
Results JSON, report.md and plots go to --out (default out/parity, ignored by git; publish with
--out reports/parity). Exit 0 only if every case passed.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..common.backend import choose_backend
from ..common.errors import UsageError, need_positive
from ..common.results import provenance, results_doc, writable_folder, write_json_atomic

EPILOG = """examples:
  spbench parity                              # the default suite (ci), results in out/parity
  spbench parity --list
  spbench parity --case zero-sft-zigzag-sp2-zero2,sft-ring-sp2
  spbench parity --suite full --backend nccl --out reports/parity-gpu
  spbench parity --stage dpo --method zigzag --sp 4 --dtype float64 --steps 3
"""


def add_arguments(p) -> None:
    p.add_argument("--suite", default="ci", help="shipped suite name (ci, full, faults) or a .toml path (default ci)")
    p.add_argument("--case", metavar="NAME[,NAME...]", help="run only these cases of the suite (see --list)")
    p.add_argument("--list", action="store_true", help="list the suite's cases and exit")
    p.add_argument("--fail-fast", action="store_true", help="stop after the first case that does not pass")
    p.add_argument("--stage", choices=["sft", "dpo"], help="single ad-hoc case instead of a suite")
    p.add_argument("--pref-loss", default="sigmoid", help="ad-hoc dpo loss (default sigmoid)")
    p.add_argument("--method", default="zigzag", help="ad-hoc SP method (default zigzag)")
    p.add_argument("--sp", type=int, default=2, help="ad-hoc SP size (default 2)")
    p.add_argument("--dtype", default="float64", help="ad-hoc dtype (default float64)")
    p.add_argument("--steps", type=int, default=3, help="ad-hoc optimizer steps (default 3)")
    p.add_argument("--model", default="tiny", help="ad-hoc model preset or checkpoint dir (default tiny)")
    p.add_argument("--out", default="out/parity", help="results JSON, report.md and plots go here (default out/parity)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl", "gloo-cuda"], help="process-group backend")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a case's ranks are killed")
    p.add_argument("--json", action="store_true", help="print the results JSON path as a JSON line last")
    p.add_argument("--noise-floor", metavar="DTYPE", help="instead: measure the gap between two SP-off runs that "
                   "differ only in reduction order (batch 1 × accum 4 vs batch 2 × accum 2) and write it to --out")


def _cases(args):
    from ..check.cases import expand, load_suite, select

    if args.stage:
        return "adhoc", expand({"stage": args.stage, "pref_loss": args.pref_loss if args.stage == "dpo" else None,
                                "method": args.method, "sp": args.sp, "dtype": args.dtype, "steps": args.steps,
                                "model": args.model,
                                "config": {"cutoff_len": 64, "max_samples": 16, "learning_rate": 1e-3}})
    suite, cases = load_suite(args.suite)
    return suite, select(cases, args.case) if args.case else cases


def _validate(cases) -> None:
    """Every case's configs, before any rank is spawned (one line, exit 2, for the first bad one)."""
    from ..check.tolerances import TOLERANCES
    from ..common.deepspeed import deepspeed_files

    with deepspeed_files() as deepspeed:
        for c in cases:
            if c.dtype not in TOLERANCES:
                raise UsageError(f"case {c.name}: dtype {c.dtype!r} has no tolerance; use one of {', '.join(TOLERANCES)}")
            c.train_config(True, deepspeed=deepspeed), c.train_config(False)


def _noise_floor(args) -> int:
    import torch

    from ..check.parity import noise_floor
    from ..check.tolerances import TOLERANCES

    if args.noise_floor not in TOLERANCES:
        raise UsageError(f"--noise-floor {args.noise_floor!r}: choose from {', '.join(TOLERANCES)}")
    t0 = time.perf_counter()
    doc = noise_floor(args.noise_floor, args.steps, args.model, "cuda" if torch.cuda.is_available() else "cpu")
    doc["provenance"] = provenance(" ".join(["spbench", *sys.argv[1:]]), "none", 1, 0, time.perf_counter() - t0)
    path = Path(args.out) / f"noise-floor-{args.noise_floor}-{doc['device']}.json"
    write_json_atomic(path, doc)
    print(f"noise floor {args.noise_floor} on {doc['device']}: loss gaps {doc['loss_rel_gap']}, "
          f"grad-norm gaps {doc['grad_norm_rel_gap']} → {path}")
    return 0


def run(args) -> int:
    need_positive(timeout=args.timeout, sp=args.sp, steps=args.steps)
    choose_backend(args.backend, 1)  # nccl / gloo-cuda without CUDA: one line now
    if args.noise_floor:
        return _noise_floor(args)
    suite, cases = _cases(args)
    _validate(cases)
    if args.list:
        for c in cases:
            print(f"{c.name:<44} {c.stage:<4} {c.method:<9} sp={c.sp} dp={c.dp} ga={c.ga} {c.dtype} "
                  f"packing={c.packing} zero={c.zero} offload={c.offload}")
        return 0
    from ..check.parity import run_cases
    from ..report import render

    out = writable_folder(args.out, "--out")
    for stale in (out / f"{suite}.json", out / "report.md"):  # a run that dies must not leave the last one looking current
        stale.unlink(missing_ok=True)

    t0 = time.perf_counter()
    print(f"parity: suite {suite}, {len(cases)} cases, backend {args.backend}", flush=True)
    results = run_cases(cases, args.backend, args.timeout, fail_fast=args.fail_fast)
    wall = time.perf_counter() - t0
    prov = provenance(" ".join(["spbench", *sys.argv[1:]]), args.backend, max(c.world for c in cases), 0, wall)
    doc = results_doc(suite, results, prov)
    path = out / f"{suite}.json"
    write_json_atomic(path, doc)
    report = render([path], out)
    n_pass = sum(r["passed"] for r in results)
    print(f"parity: {n_pass}/{len(results)} cases passed in {wall:.1f} s; results {path}, report {report}")
    if args.json:
        print(json.dumps({"results": str(path), "report": str(report), "passed": doc["passed"]}))
    return 0 if doc["passed"] else 1
