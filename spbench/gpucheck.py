"""`spbench gpu-check`: one prepared run of GPU checks on one H100/H200, within a total time budget.

The steps run in this order, each as a subprocess (`python -m ...` from the repository root) with its own timeout,
clipped to what is left of --budget; a step whose turn comes with less than MIN_STEP_S seconds left is recorded
as "skipped: budget" and not started:
  1. attention  `spbench check-attention` for zigzag, ulysses, hybrid on 2 gloo-cuda ranks, bfloat16,
                seq 4096, 28 heads, 4 kv heads, head dim 128: passed, max errors, the kernel chosen
  2. parity     `spbench parity` ad-hoc case sft zigzag sp 2, bfloat16, gloo-cuda, 3 steps: passed, max errors
  3. probes     `python -m spbench.probe` plain (no tiled loss, no tiled MLP) vs ours (defaults) for
                qwen2.5-0.5b and qwen2.5-7b SFT at 16384 tokens: peak GiB, tokens/s, bytes per token, and the
                memory model's prediction for the same setup with its relative error (predicted / measured − 1)
  4. maxlen     one probe of qwen2.5-0.5b (ours) at --maxlen-fraction × the memory model's predicted maximum
                length on one GPU of --gpu-mem GiB: success or OOM
Results go to <out>/gpu-check-<UTC date>.json (schema spbench.gpu-check/1), rewritten atomically after every step
so an interrupted run keeps what it measured. Exit 0 when every executed check passed (a probe passes when its
step completed; an OOM fails), 1 when one failed, 2 for bad input or without a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from runtime.memory import MemoryFeatures

from . import memmodel
from .errors import UsageError
from .probe import last_json
from .results import provenance, write_json_atomic

SCHEMA = "spbench.gpu-check/1"
GiB = 2**30
REPO = Path(__file__).resolve().parents[1]

ATTN_METHODS = ("zigzag", "ulysses", "hybrid")
ATTN_SHAPE = {"seq": 4096, "heads": 28, "kv_heads": 4, "head_dim": 128}  # Qwen2.5-7B heads; the float64 oracle is dense on the host
PROBE_MODELS = ("qwen2.5-0.5b", "qwen2.5-7b")
PROBE_LENGTH = 16384
VARIANTS = {"plain": MemoryFeatures.plain(), "ours": MemoryFeatures()}
MAXLEN_MODEL = "qwen2.5-0.5b"
RESOLUTION = 1024
KINDS = ("attention", "parity", "probes", "maxlen")
TIMEOUTS = {"attention": 120.0, "parity": 150.0, "probes": 180.0, "maxlen": 540.0}
"""Seconds per step before it is killed (its whole process group); each is also clipped to the budget left."""
MIN_STEP_S = 10.0
"""A step is not started with less than this left: a Python process importing torch takes ~5 s by itself."""
DEFAULT_GPU_MEM_GIB = 139.0
"""--dry-run without a GPU and without --gpu-mem plans for an H200 (as reports/measurements records it)."""
MODEL_ERROR_GOAL = 0.10
"""Issue 5's goal for the memory model (|error| ≤ 10%); recorded per probe, it does not fail a check."""
SKIPPED = "skipped: budget"

EPILOG = """examples:
  spbench gpu-check --dry-run                       # the planned commands, no GPU needed
  spbench gpu-check                                 # the full run, 540 s budget, results in reports/gpu/
  spbench gpu-check --only maxlen --maxlen-fraction 0.1 --budget 200
  nox -s gpu -- --budget 300
"""


# ----------------------------------------------------------------------------------------------------- plan
@dataclass
class Step:
    """One planned command: `args` follow the Python interpreter; `info` is copied into the step's record."""

    name: str
    kind: str
    args: tuple[str, ...]
    timeout_s: float
    info: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        return "python " + shlex.join(self.args)


def probe_setup(model: str, variant: str, gpu_mem_gib: float) -> memmodel.Setup:
    """The memory model's description of a probe: one GPU, no DeepSpeed, SFT, `variant`'s features."""
    return memmodel.Setup(model, "sft", gpus=1, gpu_mem_gib=gpu_mem_gib, sp=1, zero=0, features=VARIANTS[variant])


def probe_args(model: str, length: int, features: MemoryFeatures, cap_gib: float | None) -> tuple[str, ...]:
    """`spbench.probe` arguments for one SFT step; the features are spelled out so probe and model agree.
    `cap_gib` caps the probe's GPU memory (--gpu-mem given); None: the whole device."""
    loss = "none" if features.tiled_loss_chunk is None else str(features.tiled_loss_chunk)
    mlp = "none" if features.tiled_mlp_chunks is None else str(features.tiled_mlp_chunks)
    cap = () if cap_gib is None else ("--gpu-mem-gib", f"{cap_gib:g}")
    return ("-m", "spbench.probe", "--model", model, "--stage", "sft", "--length", str(length),
            "--loss-chunk", loss, "--mlp-chunks", mlp, *cap)


def _prediction(setup: memmodel.Setup, length: int) -> dict:
    pred = memmodel.peak_memory(setup, length)
    return {"predicted_gib": pred["total_gib"], "predicted_phase": pred["phase"], "predicted_fits": pred["fits"]}


def build_plan(gpu_mem_gib: float, maxlen_fraction: float, parity_out: Path, kinds=KINDS,
               cap_gib: float | None = None) -> list[Step]:
    """The steps of one run, in order (only those of `kinds`); the memory model sees `gpu_mem_gib`, the probes
    are capped at `cap_gib` (None: no cap). Raises UsageError when the memory model predicts that not even
    RESOLUTION tokens of the maxlen model fit on `gpu_mem_gib`."""
    steps = []
    if "attention" in kinds:
        shape = ATTN_SHAPE
        for method in ATTN_METHODS:
            args = ("-m", "spbench", "check-attention", "--method", method, "--sp", "2", "--heads", str(shape["heads"]),
                    "--kv-heads", str(shape["kv_heads"]), "--seq", str(shape["seq"]), "--head-dim",
                    str(shape["head_dim"]), "--dtype", "bfloat16", "--backend", "gloo-cuda",
                    "--timeout", f"{TIMEOUTS['attention']:g}", "--json")
            steps.append(Step(f"attention-{method}", "attention", args, TIMEOUTS["attention"],
                              {"method": method, "sp": 2, "dtype": "bfloat16", **shape}))
    if "parity" in kinds:
        args = ("-m", "spbench", "parity", "--stage", "sft", "--method", "zigzag", "--sp", "2", "--dtype", "bfloat16",
                "--steps", "3", "--backend", "gloo-cuda", "--timeout", f"{TIMEOUTS['parity']:g}",
                "--out", str(parity_out), "--json")
        steps.append(Step("parity-sft-zigzag-sp2", "parity", args, TIMEOUTS["parity"],
                          {"stage": "sft", "method": "zigzag", "sp": 2, "dtype": "bfloat16", "steps": 3}))
    if "probes" in kinds:
        for model in PROBE_MODELS:
            for variant, features in VARIANTS.items():
                info = {"model": model, "variant": variant, "stage": "sft", "length": PROBE_LENGTH,
                        "features": features.to_json(),
                        **_prediction(probe_setup(model, variant, gpu_mem_gib), PROBE_LENGTH)}
                steps.append(Step(f"probe-{model}-{variant}-{PROBE_LENGTH // 1024}k", "probes",
                                  probe_args(model, PROBE_LENGTH, features, cap_gib), TIMEOUTS["probes"], info))
    if "maxlen" in kinds:
        setup = probe_setup(MAXLEN_MODEL, "ours", gpu_mem_gib)
        predicted_max = memmodel.maxlen_for(setup, resolution=RESOLUTION)
        if predicted_max == 0:
            raise UsageError(f"the memory model predicts that {MAXLEN_MODEL} does not fit on {gpu_mem_gib:g} GiB "
                             f"at any length; give the GPU's memory with --gpu-mem (e.g. 80)")
        length = max(RESOLUTION, int(predicted_max * maxlen_fraction) // RESOLUTION * RESOLUTION)
        info = {"model": MAXLEN_MODEL, "variant": "ours", "stage": "sft", "gpu_mem_gib": gpu_mem_gib,
                "predicted_max_len": predicted_max, "maxlen_fraction": maxlen_fraction, "length": length,
                "features": VARIANTS["ours"].to_json(), **_prediction(setup, length)}
        steps.append(Step(f"maxlen-{MAXLEN_MODEL}", "maxlen", probe_args(MAXLEN_MODEL, length, VARIANTS["ours"],
                                                                         cap_gib), TIMEOUTS["maxlen"], info))
    return steps


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Completed:
    """What one command did: exit code (None when killed at its timeout), output, seconds it ran."""

    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False


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


def model_error(predicted_gib: float | None, measured_gib: float | None) -> float | None:
    """Relative error of the memory model, predicted / measured − 1 (as memmodel.compare_measurements)."""
    if not isinstance(predicted_gib, (int, float)) or not isinstance(measured_gib, (int, float)) or measured_gib <= 0:
        return None
    return predicted_gib / measured_gib - 1


def bytes_per_token(probe: dict, tokens: int) -> tuple[float | None, str | None]:
    """(bytes, basis): (peak − static) / tokens when the probe reports "static_gib", else peak / tokens."""
    peak, static = probe.get("peak_gib"), probe.get("static_gib")
    if not isinstance(peak, (int, float)):
        return None, None
    if isinstance(static, (int, float)):
        return (peak - static) * GiB / tokens, "(peak - static) / tokens"
    return peak * GiB / tokens, "peak / tokens"


def _no_json(done: Completed) -> str:
    tail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or [""]
    return f"exit {done.returncode}, no JSON: {tail[0][:300]}"


def parse_attention(step: Step, out: dict | None, done: Completed) -> dict:
    if out is None or "passed" not in out:
        return {"passed": False, "reason": _no_json(done)}
    rel, tol = out.get("max_rel_err") or {}, out.get("tolerance")
    rec = {"passed": bool(out["passed"]) and done.returncode == 0, "kernel": out.get("kernel"), "tolerance": tol,
           "max_rel_err": rel, "max_abs_err": out.get("max_abs_err") or {}}
    if not rec["passed"]:
        worst = max(rel, key=lambda q: rel[q], default=None)
        rec["reason"] = f"{worst} rel err {rel[worst]:.3g} > {tol:.0e}" if worst and tol else _no_json(done)
    return rec


def parse_parity(step: Step, out: dict | None, done: Completed) -> dict:
    if out is None or "results" not in out:
        return {"passed": False, "reason": _no_json(done)}
    try:
        case = json.loads(Path(out["results"]).read_text(encoding="utf-8"))["cases"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return {"passed": False, "results": out["results"], "reason": f"cannot read {out['results']}: {e}"}
    rec = {"passed": bool(case.get("passed")) and done.returncode == 0, "results": out["results"],
           "metrics": case.get("metrics", {}), "tolerance": case.get("tolerance"), "failures": case.get("failures", []),
           "error": case.get("error")}
    if not rec["passed"]:
        rec["reason"] = case.get("error") or (rec["failures"] or [f"exit {done.returncode}"])[0]
    return rec


PROBE_FIELDS = ("peak_gib", "reserved_gib", "nvml_peak_used_gib", "static_gib", "step_s", "tokens_per_s",
                "device_name", "loss")


def parse_probe(step: Step, out: dict | None, done: Completed) -> dict:
    if out is None or "status" not in out:
        rec = {"passed": False, "probe_status": "error", "reason": _no_json(done)}
    else:
        rec = {"passed": out["status"] == "ok", "probe_status": out["status"],
               **{k: out.get(k) for k in PROBE_FIELDS if k in out}}
        if out["status"] == "ok":
            tokens = out.get("tokens") or step.info["length"]
            rec["bytes_per_token"], rec["bytes_per_token_basis"] = bytes_per_token(out, tokens)
            err = model_error(step.info.get("predicted_gib"), out.get("peak_gib"))
            rec["model_error"] = err
            rec["model_error_within_goal"] = None if err is None else abs(err) <= MODEL_ERROR_GOAL
        else:
            rec["reason"] = out.get("error") or out["status"]
    if step.kind == "maxlen":
        rec["result"] = "success" if rec["passed"] else rec["probe_status"]
    return rec


PARSERS = {"attention": parse_attention, "parity": parse_parity, "probes": parse_probe, "maxlen": parse_probe}


def evaluate(step: Step, done: Completed, timeout_s: float, clipped: bool) -> dict:
    """The step's record: its plan, how the command ended, and what its output says."""
    rec = {"name": step.name, "kind": step.kind, "command": step.command, **step.info, "timeout_s": timeout_s,
           "returncode": done.returncode, "wall_s": round(done.wall_s, 3)}
    if done.timed_out:
        rec.update(passed=False, reason=f"timeout after {timeout_s:.0f} s" + (" (budget)" if clipped else ""))
        if step.kind == "maxlen":
            rec["result"] = "timeout"
    else:
        rec.update(PARSERS[step.kind](step, last_json(done.stdout), done))
    rec["status"] = "passed" if rec["passed"] else "failed"
    return rec


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


# ------------------------------------------------------------------------------------------- the document
def comparisons(records: list[dict]) -> list[dict]:
    """Per probe model: plain and ours side by side, and ours / plain tokens/s (None unless both ran)."""
    rows = []
    for model in PROBE_MODELS:
        by = {r["variant"]: r for r in records if r["kind"] == "probes" and r["model"] == model}
        if not by:
            continue
        keys = ("status", "peak_gib", "predicted_gib", "model_error", "tokens_per_s", "bytes_per_token")
        row = {"model": model, "length": PROBE_LENGTH,
               **{v: {k: by[v].get(k) for k in keys} for v in VARIANTS if v in by}}
        rates = [by.get(v, {}).get("tokens_per_s") for v in ("ours", "plain")]
        both = all(isinstance(x, (int, float)) and x > 0 for x in rates)
        row["tokens_per_s_ratio"] = rates[0] / rates[1] if both else None
        rows.append(row)
    return rows


def document(records: list[dict], settings: dict, device: dict | None, prov: dict, final: bool) -> dict:
    """The spbench.gpu-check/1 document (`final` False while steps are still running)."""
    executed = [r for r in records if r["status"] != SKIPPED]
    skipped = [r["name"] for r in records if r["status"] == SKIPPED]
    return {"schema": SCHEMA, "passed": all(r["passed"] for r in executed), "complete": final and not skipped,
            "final": final, "device": device, "settings": settings, "provenance": prov, "steps": records,
            "comparisons": comparisons(executed),
            "summary": {"executed": len(executed), "passed": sum(bool(r["passed"]) for r in executed),
                        "failed": [r["name"] for r in executed if not r["passed"]], "skipped": skipped}}


def _fmt(x, spec: str, none: str = "-") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else none


def detail(rec: dict) -> str:
    """One short line of what a step found."""
    kind, reason = rec["kind"], rec.get("reason")
    if rec["status"] == SKIPPED:
        return reason
    failed = f"; {reason}" if reason else ""
    if kind == "attention" and "kernel" in rec:
        worst = max(rec["max_rel_err"].values(), default=None)
        return f"kernel {rec['kernel']}, max rel err {_fmt(worst, '.1e')} (tol {_fmt(rec['tolerance'], '.0e')}){failed}"
    if kind == "parity" and "metrics" in rec:
        m = rec["metrics"]
        return (f"max rel err: loss {_fmt(m.get('max_loss_rel_err'), '.1e')}, "
                f"grad norm {_fmt(m.get('max_grad_norm_rel_err'), '.1e')}, "
                f"param grad {_fmt(m.get('max_param_grad_rel_err'), '.1e')}{failed}")
    where = f" at length {rec['length']:,}" if kind == "maxlen" else ""
    if rec.get("probe_status") == "oom":
        return f"OOM{where} (predicted {rec['predicted_gib']:.1f} GiB)"
    if rec.get("probe_status") != "ok":
        return f"{reason}{where}"
    err, bpt = rec.get("model_error"), rec.get("bytes_per_token")
    text = (f"peak {_fmt(rec.get('peak_gib'), '.1f')} GiB (model {rec['predicted_gib']:.1f}, "
            f"{_fmt(None if err is None else 100 * err, '+.1f')}%), {_fmt(rec.get('tokens_per_s'), ',.0f')} tokens/s, "
            f"{_fmt(None if bpt is None else bpt / 1e6, '.2f')} MB/token")
    if kind == "maxlen":
        text = (f"{rec['result']}{where} = {rec['maxlen_fraction']:g} x predicted max {rec['predicted_max_len']:,}; "
                + text)
    return text


def format_table(doc: dict) -> str:
    """The compact summary: one line per step, then ours vs plain per model."""
    rows = [(r["name"], r["status"], _fmt(r.get("wall_s"), ".1f"), detail(r)) for r in doc["steps"]]
    w = [max(len(x[i]) for x in [("step", "status", "wall s", ""), *rows]) for i in range(3)]
    lines = [f"{'step':<{w[0]}}  {'status':<{w[1]}}  {'wall s':>{w[2]}}  result", "-" * (sum(w) + 14)]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    for c in doc["comparisons"]:
        lines.append(f"{c['model']} at {c['length']:,}: ours / plain tokens/s = {_fmt(c['tokens_per_s_ratio'], '.2f')}")
    s = doc["summary"]
    verdict = "PASSED" if doc["passed"] else "FAILED"
    lines.append(f"{verdict}: {s['passed']}/{s['executed']} executed checks passed"
                 + (f", {len(s['skipped'])} skipped (budget)" if s["skipped"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
def register(subs) -> None:
    p = subs.add_parser("gpu-check", help="one prepared run of GPU checks on one H100/H200 within a time budget",
                        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=540.0, help="total seconds for all steps (default 540)")
    p.add_argument("--gpu-mem", type=float, help="GiB of the GPU for the memory model and the probes' cap "
                   "(default: torch.cuda.get_device_properties(0); dry run without GPU: 139)")
    p.add_argument("--maxlen-fraction", type=float, default=0.1,
                   help="step 4 probes this fraction of the predicted max length (default 0.1: attention time grows with the square of the length)")
    p.add_argument("--only", help=f"comma separated subset of {','.join(KINDS)} (default all)")
    p.add_argument("--out", default="reports/gpu", help="directory for gpu-check-<UTC date>.json (default reports/gpu)")
    p.add_argument("--dry-run", action="store_true", help="print the planned commands and exit (no GPU needed)")
    p.add_argument("--json", action="store_true", help="end stdout with the results document as one JSON line")
    p.set_defaults(func=run)


def cuda_device() -> dict | None:
    """{"name", "total_gib", "count"} of CUDA device 0, or None. get_device_properties creates no CUDA context,
    so this process holds no GPU memory while the steps run."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return None
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "total_gib": props.total_memory / GiB, "count": torch.cuda.device_count()}
    except Exception:  # noqa: BLE001 — a broken CUDA install is no GPU
        return None


def check_args(args) -> tuple[str, ...]:
    """Validate the flags (UsageError, exit 2); returns the step kinds to run."""
    if not args.budget >= MIN_STEP_S:
        raise UsageError(f"--budget {args.budget:g} s is too short; give at least {MIN_STEP_S:g} s (default 540)")
    if not 0 < args.maxlen_fraction <= 1:
        raise UsageError(f"--maxlen-fraction {args.maxlen_fraction:g} must be in (0, 1], e.g. 0.5")
    if args.gpu_mem is not None and not args.gpu_mem > memmodel.CUDA_CONTEXT_GIB:
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
