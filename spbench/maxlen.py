"""`spbench maxlen`: the longest trainable sequence per model and stage: measured on a GPU, or estimated.

With a CUDA GPU (and without --estimate) the length is measured by an OOM-safe search: start from the memory
model's prediction, grow or shrink geometrically until one probe succeeds and one fails, then bisect to the
resolution. Each probe is one full training step in a fresh `python -m spbench.probe` process; an OOM, a crash
or a timeout is a failed probe and the search goes on. Every probe is appended to <out>/probes.jsonl at once
(flushed and fsynced); --resume reads it back and skips probes already done. The probe runs one GPU without
DeepSpeed; other setups run the trainer itself on --gpus ranks (`python -m spbench.distprobe`: SP, ZeRO, offload),
with NCCL when the machine has that many GPUs, or with --emulate as that many gloo ranks sharing GPU 0, each
capped at --gpu-mem (so --gpus × --gpu-mem must fit on the card). A setup the machine cannot run is estimated.
Without a GPU, or with --estimate, the answer is the memory model's (spbench/memmodel.py), labelled "estimated".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from runtime.memory import AUTO, DEFAULT_LOSS_CHUNK, MemoryFeatures
from runtime.models import ModelError, model_config

from . import memmodel
from .errors import UsageError
from .probe import SubprocessProbe

SCHEMA = "spbench.maxlen/1"
PROBE_SCHEMA = "spbench.maxlen.probe/1"
SUITE_SCHEMA = "spbench.maxlen-suite/1"
GiB = 2**30

EPILOG = """examples:
  spbench maxlen --model qwen2.5-7b                                   # 8 × 80 GiB, SP 8, ZeRO-3 + offload, estimated
  spbench maxlen --suite suites/maxlen-qwen2.5.toml --json            # the seed table, ours vs plain
  spbench maxlen --model qwen2.5-7b --no-tiled-loss --no-tiled-mlp    # what plain transformers would reach
  spbench maxlen --model qwen2.5-0.5b,qwen2.5-7b --gpus 1 --zero 0 --offload none --gpu-mem 139 --stage sft,dpo
  spbench maxlen --model qwen2.5-0.5b --gpus 1 --zero 0 --offload none --out runs/maxlen --resume   # on a GPU
"""


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One row of the table: a model, a stage and a full setup, with its features variant name."""

    model: str
    stage: str
    gpus: int
    gpu_mem_gib: float
    sp: int
    zero: int
    offload: tuple[str, ...]
    features: MemoryFeatures
    variant: str = "ours"
    sp_method: str = "ulysses"

    def setup(self) -> memmodel.Setup:
        return memmodel.Setup(self.model, self.stage, self.gpus, self.gpu_mem_gib, self.sp, self.zero,
                              frozenset(self.offload), self.features, self.sp_method)

    def key(self) -> dict:
        """What identifies this case's probes in probes.jsonl (resume matches on it)."""
        return {"model": self.model, "stage": self.stage, "gpus": self.gpus, "gpu_mem_gib": self.gpu_mem_gib,
                "sp": self.sp, "zero": self.zero, "offload": ",".join(self.offload) or "none",
                "sp_method": self.sp_method, "features": self.features.to_json()}

    def probe_backend(self, gpus_here: int, emulate: bool) -> str | None:
        """How a machine with `gpus_here` GPUs measures this case: "single" (one GPU, no DeepSpeed:
        spbench.probe), "nccl" (a GPU per rank: spbench.distprobe), "gloo-cuda" (--emulate: every rank on
        GPU 0), or None (it cannot: estimate)."""
        if gpus_here < 1:
            return None
        if self.gpus == 1 and self.zero == 0 and not self.offload:
            return "single"
        if gpus_here >= self.gpus:
            return "nccl"
        return "gloo-cuda" if emulate else None


# ----------------------------------------------------------------------------------------------- search
@dataclass
class SearchOutcome:
    """max_len: largest successful length (0: none); best: that probe; failed_above: smallest failed length
    above it (None: the cap was reached); probes: every result used, in order (reused ones included)."""

    max_len: int
    best: dict | None
    failed_above: int | None
    probes: list[dict] = field(default_factory=list)


def search_max_len(probe: Callable[[int], dict], start: int, resolution: int = 1024, cap: int = 1 << 24,
                   growth: float = 1.5, known: dict[int, dict] | None = None) -> SearchOutcome:
    """Largest length (multiple of `resolution`, ≤ cap) whose probe succeeds, assuming success is monotone.

    `probe(length)` returns a dict with "status" ("ok" is success; "oom", "timeout", "error" are failures).
    Bracket from `start`: grow by `growth` until a failure, or shrink until a success; then bisect until the
    failed and successful lengths are `resolution` apart. `known` (length → result) answers without probing
    (resume). Example: threshold 50_000, start 40_960, resolution 1024 → probes 40960 ok, 61440 oom, then
    bisection → max_len 49152.
    """
    if resolution < 1 or growth <= 1 or cap < resolution:
        raise ValueError(f"need resolution >= 1, growth > 1, cap >= resolution; got {resolution}, {growth}, {cap}")
    known = dict(known or {})
    out = SearchOutcome(0, None, None)

    def snap(x: float) -> int:
        return min(cap // resolution, max(1, int(x) // resolution)) * resolution

    def ok(length: int) -> bool:
        result = known.get(length)
        if result is None:
            result = known[length] = probe(length)
        out.probes.append(result)
        return result.get("status") == "ok"

    good, bad = 0, None
    length = snap(start)
    if ok(length):
        good = length
        while good < snap(cap):
            length = max(good + resolution, snap(good * growth))
            length = min(length, snap(cap))
            if not ok(length):
                bad = length
                break
            good = length
    else:
        bad = length
        while bad > resolution:
            length = min(bad - resolution, snap(bad / growth))
            if ok(length):
                good = length
                break
            bad = length
    while bad is not None and bad - good > resolution:
        mid = max(good + resolution, snap((good + bad) // 2))
        if ok(mid):
            good = mid
        else:
            bad = mid
    out.max_len, out.failed_above = good, bad
    out.best = known.get(good) if good else None
    return out


# ------------------------------------------------------------------------------------------ probe runner
class ProbeLog:
    """<out>/probes.jsonl: one record per probe, appended and fsynced at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False  # a crash mid-write leaves a last line without newline: start a fresh line after it
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def done(self, case: Case) -> dict[int, dict]:
        """length → result of this case's probes already in the file (a torn last line is skipped)."""
        if not self.path.exists():
            return {}
        key, found = case.key(), {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("case") == key and isinstance(rec.get("length"), int):
                found[rec["length"]] = rec
        return found


def logged_probe(case: Case, probe: Callable[[int], dict], log: ProbeLog, progress=sys.stderr) -> Callable[[int], dict]:
    """Wrap `probe`: each result gets the case, the prediction and a timestamp and goes to the log at once;
    one progress line per probe goes to `progress` (its first half before the probe runs)."""
    setup, shape = case.setup(), memmodel.shape_of(case.model)
    count = [0]

    def run(length: int) -> dict:
        count[0] += 1
        predicted = memmodel.peak_memory(setup, length, shape)["total_gib"]
        print(f"maxlen: probe {count[0]}: {case.model} {case.stage} {case.variant} length {length:,} "
              f"(predicted {predicted:.1f} GiB) ...", end="", file=progress, flush=True)
        result = dict(probe(length))
        record = {"schema": PROBE_SCHEMA, "case": case.key(), "variant": case.variant, "length": length,
                  "predicted_gib": predicted, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **{k: v for k, v in result.items() if k not in ("case", "length", "schema")}}
        log.append(record)
        peak, rate = result.get("peak_gib"), result.get("tokens_per_s")
        detail = "".join([f", peak {peak:.1f} GiB" if isinstance(peak, (int, float)) else "",
                          f", {rate:,.0f} tokens/s" if isinstance(rate, (int, float)) else "",
                          f": {result['error']}" if result.get("error") else ""])
        print(f" {record.get('status')}{detail}", file=progress, flush=True)
        return record

    return run


# ----------------------------------------------------------------------------------------------- rows
def estimate_row(case: Case, resolution: int) -> dict:
    setup = case.setup()
    max_len = memmodel.maxlen_for(setup, resolution=resolution)
    pred = memmodel.peak_memory(setup, max_len) if max_len else None
    return _row(case, max_len, "estimated", pred["total_gib"] if pred else None,
                predicted_gib=pred["total_gib"] if pred else None, peak_phase=pred["phase"] if pred else None,
                host_gib=pred["host_gib"] if pred else None)


def measured_row(case: Case, outcome: SearchOutcome, resolution: int, how: str = "single") -> dict:
    """The table row of a search; `how` is the probe backend (Case.probe_backend: "gloo-cuda" = emulated)."""
    best = outcome.best or {}
    pred = memmodel.peak_memory(case.setup(), outcome.max_len)["total_gib"] if outcome.max_len else None
    return _row(case, outcome.max_len, "measured", best.get("peak_gib"), predicted_gib=pred,
                failed_above=outcome.failed_above, resolution=resolution, probes=len(outcome.probes),
                tokens_per_s=best.get("tokens_per_s"), step_s=best.get("step_s"),
                nvml_peak_used_gib=best.get("nvml_peak_used_gib"), measured_gpu_mem_gib=best.get("gpu_mem_gib"),
                device=best.get("device_name"), probe_backend=how, emulated=how == "gloo-cuda",
                estimated_max_len=memmodel.maxlen_for(case.setup(), resolution=resolution))


def _row(case: Case, max_len: int, source: str, peak_gib, **extra) -> dict:
    return {"model": case.model, "stage": case.stage, "variant": case.variant, "gpus": case.gpus,
            "gpu_mem_gib": case.gpu_mem_gib, "sp": case.sp, "zero": case.zero,
            "offload": ",".join(case.offload) or "none", "sp_method": case.sp_method,
            "features": case.features.to_json(), "max_len": max_len, "source": source, "peak_gib": peak_gib,
            **extra}


def format_table(rows: list[dict]) -> str:
    """The seed-style table: model × stage × variant × SP → max length, source, peak GiB."""
    head = ["model", "stage", "variant", "GPUs", "SP", "ZeRO", "offload", "max length", "≈", "source", "peak GiB"]
    body = []
    for r in rows:
        n = r["max_len"]
        short = f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n // 1024}k"
        peak = f"{r['peak_gib']:.1f}" if isinstance(r["peak_gib"], (int, float)) else "-"
        body.append([r["model"], r["stage"], r["variant"], f"{r['gpus']}×{r['gpu_mem_gib']:g} GiB", str(r["sp"]),
                     str(r["zero"]), r["offload"], f"{n:,}", short, r["source"], peak])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    right = {4, 5, 7, 8, 10}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


# -------------------------------------------------------------------------------------- provenance, I/O
def provenance(command: str, backend: str, world: int, seed: int = 0, wall_time_s: float | None = None) -> dict:
    """spbench.results.provenance when it exists; else a minimal record of our own."""
    try:
        from spbench.results import provenance as shared
    except ImportError:
        shared = None
    if shared is not None:
        return shared(command, backend, world, seed, wall_time_s=wall_time_s)
    import platform

    import torch
    import transformers

    return {"command": command, "backend": backend, "world": world, "seed": seed, "wall_time_s": wall_time_s,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write `doc` to `path` via a temporary file in the same directory and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ CLI
def register(subs) -> None:
    p = subs.add_parser("maxlen", help="longest trainable sequence per model and stage (measured or estimated)",
                        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset(s) or checkpoint dir(s), comma separated (e.g. qwen2.5-7b,qwen2.5-14b)")
    p.add_argument("--suite", help="suite TOML (e.g. suites/maxlen-qwen2.5.toml); flags given override it")
    p.add_argument("--stage", help="sft, dpo or sft,dpo (default sft)")
    p.add_argument("--gpus", type=int, help="GPUs in the job (default 8)")
    p.add_argument("--gpu-mem", type=float, help="GiB per GPU as the driver reports it (default 80)")
    p.add_argument("--sp", help="SP size(s), comma separated (default: --gpus)")
    p.add_argument("--sp-method", choices=memmodel.SP_METHODS, help="SP strategy (default ulysses)")
    p.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0|2|3 (0: no DeepSpeed; default 3)")
    p.add_argument("--offload", help="none, optimizer, param or optimizer,param (default optimizer,param)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer activation checkpointing (default on)")
    p.add_argument("--no-tiled-loss", action="store_true", help="full-vocabulary logits (plain transformers)")
    p.add_argument("--no-tiled-mlp", action="store_true", help="untiled MLP (plain transformers)")
    p.add_argument("--checkpoint-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep checkpointed hidden states in CPU memory (default off)")
    p.add_argument("--estimate", action="store_true", help="memory-model prediction even when a GPU is present")
    p.add_argument("--emulate", action="store_true",
                   help="measure a --gpus N setup on one GPU: N gloo ranks share GPU 0, each capped at --gpu-mem")
    p.add_argument("--resume", action="store_true", help="skip probes already in <out>/probes.jsonl")
    p.add_argument("--out", default="results/maxlen", help="directory for probes.jsonl and maxlen.json")
    p.add_argument("--resolution", type=int, help="search/estimate resolution in tokens (default 1024)")
    p.add_argument("--probe-timeout", type=float, default=1800, help="seconds before a probe counts as failed")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line (schema spbench.maxlen/1)")
    p.set_defaults(func=run)


def _csv(value) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def _int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be an integer, got {value!r}") from None


def load_suite(path: str) -> dict:
    """A maxlen suite TOML (schema spbench.maxlen-suite/1) as a dict; UsageError when unreadable."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"suite {path!r} not found; pass a TOML file such as suites/maxlen-qwen2.5.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"suite {path!r} is not valid TOML: {e}") from None
    if doc.get("schema") != SUITE_SCHEMA:
        raise UsageError(f"suite {path!r}: schema must be {SUITE_SCHEMA!r}, got {doc.get('schema')!r}")
    known = {"schema", "description", "models", "stages", "gpus", "gpu_mem_gib", "sp", "sp_method", "zero",
             "offload", "resolution", "variants"}
    extra = set(doc) - known
    if extra:
        raise UsageError(f"suite {path!r}: unknown keys {sorted(extra)}; known: {sorted(known)}")
    return doc


VARIANT_KEYS = {"name", "tiled_loss", "tiled_mlp", "checkpoint_offload", "gradient_checkpointing", "loss_chunk"}


def _variant_features(v: dict, where: str) -> MemoryFeatures:
    extra = set(v) - VARIANT_KEYS
    if extra or "name" not in v:
        raise UsageError(f"{where}: a variant needs 'name' and only {sorted(VARIANT_KEYS)}; got {sorted(v)}")
    try:
        return MemoryFeatures(
            tiled_loss_chunk=int(v.get("loss_chunk", DEFAULT_LOSS_CHUNK)) if v.get("tiled_loss", True) else None,
            tiled_mlp_chunks=AUTO if v.get("tiled_mlp", True) else None,
            checkpoint_offload=bool(v.get("checkpoint_offload", False)),
            gradient_checkpointing=bool(v.get("gradient_checkpointing", True)))
    except ValueError as e:
        raise UsageError(f"{where}: variant {v['name']!r}: {e}") from None


def build_cases(args) -> tuple[list[Case], int]:
    """The cases the command line (and suite) ask for, validated; and the resolution."""
    suite = load_suite(args.suite) if args.suite else {}
    pick = lambda flag, key, default: flag if flag is not None else suite.get(key, default)  # noqa: E731
    models = _csv(pick(args.model, "models", ""))
    if not models:
        raise UsageError("no model given: pass --model qwen2.5-7b[,qwen2.5-14b,...] or --suite FILE")
    for m in models:
        try:
            model_config(m)
        except ModelError as e:
            raise UsageError(str(e)) from None
    stages = _csv(pick(args.stage, "stages", "sft"))
    bad = [s for s in stages if s not in memmodel.STAGES]
    if bad or not stages:
        raise UsageError(f"--stage {','.join(bad) or '(empty)'} unknown; use sft, dpo or sft,dpo")
    gpus = _int("--gpus", pick(args.gpus, "gpus", 8))
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    try:
        gpu_mem = float(pick(args.gpu_mem, "gpu_mem_gib", 80))
    except (TypeError, ValueError):
        raise UsageError(f"--gpu-mem must be a number of GiB, got {pick(args.gpu_mem, 'gpu_mem_gib', 80)!r}") from None
    if gpu_mem <= memmodel.CUDA_CONTEXT_GIB:
        raise UsageError(f"--gpu-mem {gpu_mem:g} GiB is too small; give the GPU's memory in GiB, e.g. 80")
    sps = [_int("--sp", s) for s in _csv(pick(args.sp, "sp", gpus))]
    for sp in sps:
        if sp < 1 or gpus % sp:
            raise UsageError(f"--sp {sp} must be >= 1 and divide --gpus {gpus}")
    zero = _int("--zero", pick(args.zero, "zero", 3))
    if zero not in memmodel.ZERO_STAGES:
        raise UsageError(f"--zero {zero} unsupported; use 0 (no DeepSpeed), 2 or 3")
    offload = tuple(sorted(o for o in _csv(pick(args.offload, "offload", "optimizer,param")) if o != "none"))
    if set(offload) - set(memmodel.OFFLOADS):
        raise UsageError(f"--offload {','.join(offload)} unknown; use none, optimizer, param or optimizer,param")
    if offload and zero == 0:
        raise UsageError("--offload needs DeepSpeed ZeRO: add --zero 2 or 3, or pass --offload none")
    if "param" in offload and zero != 3:
        raise UsageError(f"--offload param needs --zero 3 (got --zero {zero}); use --offload optimizer")
    sp_method = pick(args.sp_method, "sp_method", "ulysses")
    if sp_method not in memmodel.SP_METHODS:
        raise UsageError(f"sp_method {sp_method!r} unknown; use {', '.join(memmodel.SP_METHODS)}")
    resolution = _int("--resolution", pick(args.resolution, "resolution", 1024))
    if resolution < 1:
        raise UsageError(f"--resolution must be >= 1 token, got {resolution}")
    flags_given = (args.no_tiled_loss or args.no_tiled_mlp or args.checkpoint_offload is not None
                   or args.gradient_checkpointing is not None)
    if flags_given or "variants" not in suite:
        ckpt = True if args.gradient_checkpointing is None else args.gradient_checkpointing
        variant = {"name": "cli", "tiled_loss": not args.no_tiled_loss, "tiled_mlp": not args.no_tiled_mlp,
                   "checkpoint_offload": bool(args.checkpoint_offload), "gradient_checkpointing": ckpt}
        feats = _variant_features(variant, "flags")
        variants = [(_variant_name(feats), feats)]
    else:
        variants = [(v.get("name"), _variant_features(v, f"suite {args.suite!r}")) for v in suite["variants"]]
    cases = [Case(m, st, gpus, gpu_mem, sp, zero, offload, feats, name, sp_method)
             for m in models for st in stages for name, feats in variants for sp in sps]
    return cases, resolution


def _variant_name(f: MemoryFeatures) -> str:
    """plain / ours / ours+ckpt-offload for the usual combinations, else custom."""
    plain, ours = MemoryFeatures.plain(), MemoryFeatures()
    names = {plain: "plain", ours: "ours", MemoryFeatures(checkpoint_offload=True): "ours+ckpt-offload"}
    return names.get(f, "custom")


def _command(args) -> str:
    """The command line these args stand for (for provenance)."""
    parts = ["spbench", "maxlen"]
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value in (None, False):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def cuda_gpus() -> tuple[int, float]:
    """(CUDA devices, GiB of device 0); (0, 0.0) without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return 0, 0.0
        return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GiB
    except Exception:  # noqa: BLE001 — a broken CUDA install means: estimate
        return 0, 0.0


def run(args, probe_factory: Callable[[Case, str], Callable[[int], dict]] | None = None,
        gpus: Callable[[], tuple[int, float]] = cuda_gpus) -> int:
    """`spbench maxlen`. `probe_factory(case, backend)` → probe callable and `gpus()` → (count, GiB) let tests
    stand in for a GPU machine."""
    t0 = time.monotonic()
    cases, resolution = build_cases(args)
    gpus_here, device_gib = (0, 0.0) if args.estimate else gpus()
    plans = [(case, case.probe_backend(gpus_here, args.emulate)) for case in cases]
    for case, how in plans:  # before any probe runs: a bad setup must not cost a half-finished sweep
        if how == "gloo-cuda" and case.gpus * case.gpu_mem_gib > device_gib:
            raise UsageError(f"--emulate puts {case.gpus} ranks on one {device_gib:.1f} GiB GPU: give --gpu-mem "
                             f"{device_gib / case.gpus:.1f} or less")
    out = Path(args.out)
    log = ProbeLog(out / "probes.jsonl")
    rows = []
    for case, how in plans:
        if gpus_here and how is None:
            print(f"maxlen: {case.model} {case.stage}: {case.gpus} GPUs needed, this machine has {gpus_here}; "
                  f"estimating this setup instead (--emulate runs the ranks on one GPU)", file=sys.stderr)
        if how is None:
            rows.append(estimate_row(case, resolution))
            continue
        probe = (probe_factory or (lambda c, b: SubprocessProbe(c, args.probe_timeout, backend=b)))(case, how)
        start = memmodel.maxlen_for(case.setup(), resolution=resolution) or resolution
        known = log.done(case) if args.resume else {}
        if known:
            print(f"maxlen: {case.model} {case.stage}: resuming, {len(known)} probe(s) already done", file=sys.stderr)
        outcome = search_max_len(logged_probe(case, probe, log), start, resolution, known=known)
        rows.append(measured_row(case, outcome, resolution, how))
    backend = "cuda" if any(r["source"] == "measured" for r in rows) else "estimate"
    doc = {"schema": SCHEMA,
           "provenance": provenance(_command(args), backend, 1, 0, wall_time_s=round(time.monotonic() - t0, 3)),
           "rows": rows}
    write_json_atomic(out / "maxlen.json", doc)
    labels = sorted({r["source"] for r in rows})
    print(f"maxlen ({' and '.join(labels)}; tokens per sequence, DPO holds chosen + rejected; k = 1024, M = 1024²):")
    print(format_table(rows))
    if args.json:
        print(json.dumps(doc))
    return 0
