"""Running the prepared GPU check: each planned step (gpu/plan.py) as a subprocess within a total time budget.

A step runs as `python -m ...` from the repository root with its own timeout, clipped to what is left of the
budget; a step whose turn comes with less than MIN_STEP_S seconds left is recorded as "skipped: budget" and not
started. `spbench gpu-check` (cli/gpu_check.py) writes the records (gpu/results.py) after every step."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .plan import Step
from .results import SKIPPED, Completed, evaluate

REPO = Path(__file__).resolve().parents[2]
MIN_STEP_S = 10.0
"""A step is not started with less than this left: a Python process importing torch takes ~5 s by itself."""

Runner = Callable[[list[str], float], Completed]

KILL_GRACE_S = 10.0


def run_command(argv: list[str], timeout_s: float) -> Completed:
    """Run `argv` in the repository root in its own process group; at the timeout (or on Ctrl-C) kill the whole
    group (the check-attention and parity ranks too), so nothing is left running and nothing hangs."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return Completed(proc.returncode, out, err, time.monotonic() - t0)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:  # a survivor outside the group holds the pipes: give up on the output
            out, err = "", ""
        return Completed(None, out or "", err or "", time.monotonic() - t0, timed_out=True)
    except BaseException:
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_plan(steps: list[Step], runner: Runner, budget_s: float, python: str = sys.executable,
             clock: Callable[[], float] = time.monotonic, on_step: Callable[[int, dict], None] | None = None
             ) -> list[dict]:
    """Run `steps` in order within `budget_s` seconds of `clock`; one record per step (skipped ones too)."""
    start, records = clock(), []
    for i, step in enumerate(steps):
        left = budget_s - (clock() - start)
        if left < MIN_STEP_S:
            rec = {"name": step.name, "kind": step.kind, "command": step.command, **step.info, "status": SKIPPED,
                   "passed": None, "reason": f"{max(left, 0):.0f} s of the {budget_s:g} s budget left"}
        else:
            timeout = min(step.timeout_s, left)
            if on_step:
                on_step(i, {"name": step.name, "status": "running", "timeout_s": timeout})
            rec = evaluate(step, runner([python, *step.args], timeout), timeout, clipped=timeout < step.timeout_s)
        records.append(rec)
        if on_step:
            on_step(i, rec)
    return records
