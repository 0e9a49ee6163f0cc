"""The longest trainable sequence per model and stage: measured on a GPU by the search, or estimated.

A `Target` is one row of the table: a named feature variant and a memory-model `Setup`. With a CUDA GPU (and
without --estimate) each target is measured by the OOM-safe search (memory/search.py) started from the memory
model's prediction; a setup the machine cannot run is estimated. Without a GPU the answer is the memory
model's (memory/model.py), labelled "estimated".
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..common.backend import cuda_device
from ..common.errors import UsageError
from ..common.results import provenance, write_json_atomic
from ..common.schemas import MAXLEN, MAXLEN_PROBE
from ..common.table import format_table as plain_table
from ..common.table import strategy_label
from . import model as memmodel
from .search import ProbeLog, SearchOutcome, SubprocessProbe, logged_probe, search_max_len
from .setup import Setup


@dataclass(frozen=True)
class Target:
    """One row of the table: the feature variant's name (plain / ours / ours+ckpt-offload / custom) and the setup."""

    variant: str
    setup: Setup

    def key(self) -> dict:
        """What identifies this target's probes in probes.jsonl (resume matches on it)."""
        s = self.setup
        lora = {"finetuning": "lora", "lora_rank": s.lora_rank} if s.finetuning == "lora" else {}  # full: keys as before
        return {"model": s.model, "stage": s.stage, "gpus": s.gpus, "gpu_mem_gib": s.gpu_mem_gib, "sp": s.sp,
                "zero": s.zero, "offload": ",".join(sorted(s.offload)) or "none", "sp_method": s.sp_method,
                "features": s.features.to_json(), **lora}

    def probe_backend(self, gpus_here: int, emulate: bool) -> str | None:
        """How a machine with `gpus_here` GPUs measures this target: "single" (one GPU, no DeepSpeed:
        spbench.memory.probe), "nccl" (a GPU per rank: spbench.memory.distprobe), "gloo-cuda" (--emulate: every
        rank on GPU 0), or None (it cannot: estimate)."""
        s = self.setup
        if gpus_here < 1:
            return None
        if s.gpus == 1 and s.zero == 0 and not s.offload:
            return "single"
        if gpus_here >= s.gpus:
            return "nccl"
        return "gloo-cuda" if emulate else None


def estimate_row(target: Target, resolution: int) -> dict:
    max_len = memmodel.maxlen_for(target.setup, resolution=resolution)
    pred = memmodel.peak_memory(target.setup, max_len) if max_len else None
    return _row(target, max_len, "estimated", pred["total_gib"] if pred else None,
                predicted_gib=pred["total_gib"] if pred else None, peak_phase=pred["phase"] if pred else None,
                host_gib=pred["host_gib"] if pred else None)


def measured_row(target: Target, outcome: SearchOutcome, resolution: int, how: str = "single") -> dict:
    """The table row of a search; `how` is the probe backend (Target.probe_backend: "gloo-cuda" = emulated)."""
    best = outcome.best or {}
    pred = memmodel.peak_memory(target.setup, outcome.max_len)["total_gib"] if outcome.max_len else None
    return _row(target, outcome.max_len, "measured", best.get("peak_gib"), predicted_gib=pred,
                failed_above=outcome.failed_above, resolution=resolution, probes=len(outcome.probes),
                tokens_per_s=best.get("tokens_per_s"), step_s=best.get("step_s"),
                nvml_peak_used_gib=best.get("nvml_peak_used_gib"), measured_gpu_mem_gib=best.get("gpu_mem_gib"),
                device=best.get("device_name"), probe_backend=how, emulated=how == "gloo-cuda",
                estimated_max_len=memmodel.maxlen_for(target.setup, resolution=resolution))


def _row(target: Target, max_len: int, source: str, peak_gib, **extra) -> dict:
    s = target.setup
    return {"model": s.model, "stage": s.stage, "variant": target.variant, "gpus": s.gpus,
            "gpu_mem_gib": s.gpu_mem_gib, "sp": s.sp, "zero": s.zero, "offload": ",".join(sorted(s.offload)) or "none",
            "sp_method": s.sp_method, "ulysses": s.ulysses, "ring": s.sp // s.ulysses,
            "attention_kernel": s.attention_kernel, "features": s.features.to_json(), "finetuning": s.finetuning,
            **({"lora_rank": s.lora_rank} if s.finetuning == "lora" else {}), "max_len": max_len, "source": source,
            "peak_gib": peak_gib, **extra}


def format_table(rows: list[dict]) -> str:
    """The seed-style table: model × stage × variant × SP → max length, source, peak GiB."""
    head = ["model", "stage", "variant", "GPUs", "SP", "strategy", "ZeRO", "offload", "max length", "≈", "source",
            "peak GiB"]
    body = []
    for r in rows:
        n = r["max_len"]
        short = f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n // 1024}k"
        peak = f"{r['peak_gib']:.1f}" if isinstance(r["peak_gib"], (int, float)) else "-"
        body.append([r["model"], r["stage"], r["variant"], f"{r['gpus']}×{r['gpu_mem_gib']:g} GiB", str(r["sp"]),
                     strategy_label(r), str(r["zero"]), r["offload"], f"{n:,}", short, r["source"], peak])
    return plain_table(head, body, right={4, 6, 8, 9, 11})



def cuda_gpus() -> tuple[int, float]:
    """(CUDA devices, GiB of device 0); (0, 0.0) without CUDA."""
    dev = cuda_device()
    return (dev["count"], dev["total_gib"]) if dev else (0, 0.0)


def run_targets(targets: list[Target], resolution: int, out: Path, command: str, *, estimate: bool = False,
                emulate: bool = False, resume: bool = False, probe_timeout: float = 1800, as_json: bool = False,
                trace: str | None = None, trace_depth: str = "extrapolated",
                probe_factory: Callable[[Target, str], Callable[[int], dict]] | None = None,
                gpus: Callable[[], tuple[int, float]] = cuda_gpus) -> int:
    """Measure or estimate every target (`trace`: trace them, at `trace_depth`, memory/depth.py); writes
    <out>/maxlen.json and prints the table. `probe_factory(target,
    backend)` → probe callable and `gpus()` → (count, GiB) let tests stand in for a GPU machine."""
    t0 = time.monotonic()
    gpus_here, device_gib = (0, 0.0) if estimate or trace else gpus()
    plans = [(t, t.probe_backend(gpus_here, emulate)) for t in targets]
    for t, how in plans:  # before any probe runs: a bad setup must not cost a half-finished sweep
        if how == "gloo-cuda" and t.setup.gpus * t.setup.gpu_mem_gib > device_gib:
            raise UsageError(f"--emulate puts {t.setup.gpus} ranks on one {device_gib:.1f} GiB GPU: give --gpu-mem "
                             f"{device_gib / t.setup.gpus:.1f} or less")
    log = ProbeLog(out / "probes.jsonl")
    if trace:
        rows = [_trace(t, trace, resolution, log, resume, trace_depth) for t in targets]
    else:
        rows = [_measure_or_estimate(t, how, gpus_here, resolution, log, resume, probe_timeout, probe_factory)
                for t, how in plans]
    backend = ("fake" if trace else "cuda" if any(r["source"] == "measured" for r in rows) else "estimate")
    doc = {"schema": MAXLEN, "provenance": provenance(command, backend, 1, 0, wall_time_s=round(time.monotonic() - t0, 3)),
           "rows": rows}
    write_json_atomic(out / "maxlen.json", doc)
    labels = sorted({r["source"] for r in rows})
    print(f"maxlen ({' and '.join(labels)}; tokens per sequence, DPO holds chosen + rejected; k = 1024, M = 1024²):")
    print(format_table(rows))
    if as_json:
        print(json.dumps(doc))
    return 0


def _measure_or_estimate(t: Target, how: str | None, gpus_here: int, resolution: int, log: ProbeLog, resume: bool,
                         probe_timeout: float, probe_factory) -> dict:
    s = t.setup
    if gpus_here and how is None:
        print(f"maxlen: {s.model} {s.stage}: {s.gpus} GPUs needed, this machine has {gpus_here}; "
              f"estimating this setup instead (--emulate runs the ranks on one GPU)", file=sys.stderr)
    if how is None:
        return estimate_row(t, resolution)
    probe = (probe_factory or (lambda c, b: SubprocessProbe(c, probe_timeout, backend=b)))(t, how)
    start = memmodel.maxlen_for(s, resolution=resolution) or resolution
    known = log.done(t) if resume else {}
    if known:
        print(f"maxlen: {s.model} {s.stage}: resuming, {len(known)} probe(s) already done", file=sys.stderr)
    outcome = search_max_len(logged_probe(t, probe, log), start, resolution, known=known)
    return measured_row(t, outcome, resolution, how)


def _progress(line: str) -> None:
    print(f"maxlen:   {line}", file=sys.stderr, flush=True)


def _trace(t: Target, how: str, resolution: int, log: ProbeLog, resume: bool, depth: str) -> dict:
    """A traced row (memory/traced.py): "search" brackets and bisects on traced peaks as a GPU search does on
    measured ones; "check" traces the estimated row once, at the model's max length. `depth`: memory/depth.py."""
    from .traced import NotTraceable, TraceProbe, check_row

    row = estimate_row(t, resolution)
    if how == "check":
        done = log.checked(t, row["max_len"], depth) if resume else None
        if done:
            print(f"maxlen: {t.setup.model} {t.setup.stage} {t.variant}: traced before (--resume)", file=sys.stderr)
            return done
        print(f"maxlen: tracing {t.setup.model} {t.setup.stage} {t.variant} at {row['max_len']:,} ...", file=sys.stderr,
              flush=True)
        checked = check_row(row, t.setup, depth, progress=_progress)
        log.append({"schema": MAXLEN_PROBE, "case": t.key(), "variant": t.variant, "depth": depth,
                    "checked_row": checked})
        return checked
    probe = TraceProbe(t.setup, depth, progress=_progress)
    try:
        probe.check()
    except NotTraceable as e:
        return {**row, "trace_skipped": str(e)}
    known = log.done(t) if resume else {}
    outcome = search_max_len(logged_probe(t, probe, log), row["max_len"] or resolution, resolution, known=known)
    best = outcome.best or {}
    return _row(t, outcome.max_len, "traced", best.get("peak_gib"), predicted_gib=best.get("model_gib"),
                failed_above=outcome.failed_above, resolution=resolution, probes=len(outcome.probes),
                from_model=best.get("from_model"), peak_phase=best.get("peak_phase"), host_gib=best.get("host_gib"),
                trace_depth=best.get("trace_depth"), trace_s=best.get("trace_s"), estimated_max_len=row["max_len"])
