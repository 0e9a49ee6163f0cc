"""`spbench gpu-check`: one prepared run of GPU checks on one H100/H200, within a total time budget.

The steps (spbench/gpu/plan.py: attention, parity, probes, dist, maxlen) run in order, each as a subprocess
(`python -m ...` from the repository root) with its own timeout, clipped to what is left of --budget; a step
whose turn comes with less than MIN_STEP_S seconds left is recorded as "skipped: budget" and not started.
Results go to <out>/gpu-check-<UTC date>.json (schema spbench.gpu-check/1, spbench/gpu/results.py), rewritten
atomically after every step so an interrupted run keeps what it measured. Exit 0 when every executed check
passed (a probe passes when its step completed; an OOM fails), 1 when one failed, 2 for bad input or without
a CUDA GPU. The summary also prints ours / plain tokens/s at 32k and the activation MB per token against
issue 5's goals.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ..common.backend import cuda_device
from ..common.errors import UsageError
from ..common.results import provenance, write_json_atomic
from ..gpu.check import MIN_STEP_S, Runner, run_command, run_plan
from ..gpu.plan import KINDS, build_plan
from ..gpu.results import SKIPPED, document, format_table
from ..memory.setup import CUDA_CONTEXT_GIB

DEFAULT_GPU_MEM_GIB = 139.0
"""--dry-run without a GPU and without --gpu-mem plans for an H200 (as reports/measurements records it)."""

EPILOG = """examples:
  spbench gpu-check --dry-run                       # the planned commands, no GPU needed
  spbench gpu-check                                 # the full run, 540 s budget, results in out/gpu/
  spbench gpu-check --only maxlen --maxlen-fraction 0.1 --budget 200
  nox -s gpu -- --budget 300                        # results published in reports/gpu/
"""


def add_arguments(p) -> None:
    p.add_argument("--budget", type=float, default=540.0, help="total seconds for all steps (default 540)")
    p.add_argument("--gpu-mem", type=float, help="GiB of the GPU for the memory model and the probes' cap "
                   "(default: torch.cuda.get_device_properties(0); dry run without GPU: 139)")
    p.add_argument("--maxlen-fraction", type=float, default=0.1,
                   help="step 4 probes this fraction of the predicted max length (default 0.1: attention time grows with the square of the length)")
    p.add_argument("--only", help=f"comma separated subset of {','.join(KINDS)} (default all)")
    p.add_argument("--out", default="out/gpu", help="directory for gpu-check-<UTC date>.json (default out/gpu; "
                   "`nox -s gpu` publishes into reports/gpu)")
    p.add_argument("--dry-run", action="store_true", help="print the planned commands and exit (no GPU needed)")
    p.add_argument("--json", action="store_true", help="end stdout with the results document as one JSON line")


def check_args(args) -> tuple[str, ...]:
    """Validate the flags (UsageError, exit 2); returns the step kinds to run."""
    if not args.budget >= MIN_STEP_S:
        raise UsageError(f"--budget {args.budget:g} s is too short; give at least {MIN_STEP_S:g} s (default 540)")
    if not 0 < args.maxlen_fraction <= 1:
        raise UsageError(f"--maxlen-fraction {args.maxlen_fraction:g} must be in (0, 1], e.g. 0.5")
    if args.gpu_mem is not None and not args.gpu_mem > CUDA_CONTEXT_GIB:
        raise UsageError(f"--gpu-mem {args.gpu_mem:g} GiB is too small; give the GPU's memory in GiB, e.g. 80")
    kinds = tuple(k.strip() for k in (args.only or ",".join(KINDS)).split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UsageError(f"--only {args.only!r}: unknown step kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return kinds


def _command(args) -> str:
    parts = ["spbench", "gpu-check"]
    for key in ("budget", "gpu_mem", "maxlen_fraction", "only", "out"):
        if getattr(args, key) is not None:
            parts += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return " ".join(parts + [f for f in ("--dry-run", "--json") if getattr(args, f[2:].replace("-", "_"))])


def run(args, *, runner: Runner | None = None, device: Callable[[], dict | None] = cuda_device,
        clock: Callable[[], float] = time.monotonic, now: Callable[[], datetime] | None = None,
        progress=sys.stderr) -> int:
    """`spbench gpu-check`. Tests inject `runner` (commands), `device` (CUDA device 0), `clock` and `now`."""
    kinds = check_args(args)
    dev = device()
    if dev is None and not args.dry_run:
        print("gpu-check needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu_mem, source = ((args.gpu_mem, "--gpu-mem") if args.gpu_mem is not None else
                       (dev["total_gib"], "device") if dev else (DEFAULT_GPU_MEM_GIB, "default (H200)"))
    stamp = (now or (lambda: datetime.now(timezone.utc)))().strftime("%Y-%m-%d")
    out = Path(args.out).resolve()
    steps = build_plan(gpu_mem, args.maxlen_fraction, out / f"parity-{stamp}", kinds, cap_gib=args.gpu_mem)
    settings = {"budget_s": args.budget, "gpu_mem_gib": gpu_mem, "gpu_mem_source": source,
                "maxlen_fraction": args.maxlen_fraction, "min_step_s": MIN_STEP_S, "kinds": list(kinds)}
    if args.dry_run:
        print(f"gpu-check plan: {len(steps)} steps within {args.budget:g} s, GPU memory {gpu_mem:.1f} GiB ({source})")
        for i, s in enumerate(steps, 1):
            print(f"{i:>2}. {s.name:<28} timeout {s.timeout_s:>4.0f} s  {s.command}")
        return 0
    path = out / f"gpu-check-{stamp}.json"
    t0 = clock()
    records: list[dict | None] = [None] * len(steps)

    def on_step(i: int, rec: dict) -> None:
        if rec["status"] == "running":
            print(f"gpu-check: [{i + 1}/{len(steps)}] {rec['name']} (timeout {rec['timeout_s']:.0f} s) ...",
                  end="", file=progress, flush=True)
            return
        if rec["status"] == SKIPPED:
            print(f"gpu-check: [{i + 1}/{len(steps)}] {rec['name']}: {SKIPPED}", file=progress, flush=True)
        else:
            print(f" {rec['status']} ({rec['wall_s']:.1f} s)", file=progress, flush=True)
        records[i] = rec
        prov = provenance(_command(args), "cuda", 1, 0, wall_time_s=round(clock() - t0, 3))
        write_json_atomic(path, document([r for r in records if r], settings, dev, prov, final=False))

    done = run_plan(steps, runner or run_command, args.budget, clock=clock, on_step=on_step)
    doc = document(done, settings, dev, provenance(_command(args), "cuda", 1, 0, round(clock() - t0, 3)), final=True)
    write_json_atomic(path, doc)
    print(format_table(doc))
    print(f"gpu-check: results {path}")
    if args.json:
        print(json.dumps(doc))
    return 0 if doc["passed"] else 1

