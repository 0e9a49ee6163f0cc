"""The OOM-safe max-length search on a GPU: bracket and bisect over probes, each logged at once.

Each probe is one full training step in a fresh process (`SubprocessProbe`: spbench.memory.probe on one GPU,
spbench.memory.distprobe for multi-GPU setups); an OOM, a crash or a timeout is a failed probe and the search
goes on. Every probe is appended to <out>/probes.jsonl at once (flushed and fsynced); a resumed search reads
it back and skips probes already done.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..common.results import append_jsonl, last_json, read_jsonl
from ..common.schemas import MAXLEN_PROBE
from . import model as memmodel
from .step import StepSpec, step_flags


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


class ProbeLog:
    """<out>/probes.jsonl: one record per probe, appended and fsynced at once."""

    def __init__(self, path) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        append_jsonl(self.path, record)

    def done(self, target) -> dict[int, dict]:
        """length → result of this target's probes already in the file (a torn last line is skipped)."""
        key = target.key()
        return {r["length"]: r for r in read_jsonl(self.path)
                if r.get("case") == key and isinstance(r.get("length"), int)}

    def checked(self, target, max_len: int, depth: str) -> dict | None:
        """The `maxlen --trace check` row of this target at `max_len`, traced at `depth`, already in the file, or
        None."""
        key = target.key()
        rows = [r["checked_row"] for r in read_jsonl(self.path)
                if r.get("case") == key and r.get("depth") == depth and isinstance(r.get("checked_row"), dict)
                and r["checked_row"].get("max_len") == max_len]
        return rows[-1] if rows else None


def logged_probe(case, probe: Callable[[int], dict], log: ProbeLog, progress=sys.stderr) -> Callable[[int], dict]:
    """Wrap `probe`: each result gets the case, the prediction and a timestamp and goes to the log at once;
    one progress line per probe goes to `progress` (its first half before the probe runs)."""
    setup, shape = case.setup, memmodel.shape_of(case.setup.model)
    count = [0]

    def run(length: int) -> dict:
        count[0] += 1
        predicted = memmodel.peak_memory(setup, length, shape)["total_gib"]
        print(f"maxlen: probe {count[0]}: {setup.model} {setup.stage} {case.variant} length {length:,} "
              f"(predicted {predicted:.1f} GiB) ...", end="", file=progress, flush=True)
        result = dict(probe(length))
        record = {"schema": MAXLEN_PROBE, "case": case.key(), "variant": case.variant, "length": length,
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


class SubprocessProbe:
    """Runs one probe per call in a fresh process; never raises for a failed probe (used by spbench maxlen).

    `case` is a memory.maxlen.Target (its setup: model, stage, features, gpus, SP, ZeRO, offload).
    `backend` "single": `python -m spbench.memory.probe` on one GPU; "nccl" or "gloo-cuda": `python -m
    spbench.memory.distprobe`
    with the trainer on case.gpus ranks (one GPU each, or all emulated on GPU 0), each capped at gpu_mem_gib.
    `command` replaces the argv prefix (default: this Python, -m <module>); the probe's flags follow it.
    Returns the probe's last JSON line, or {"status": "timeout"} / {"status": "error", "error": ...}.
    """

    def __init__(self, case, timeout_s: float, command: list[str] | None = None, backend: str = "single") -> None:
        self.case, self.timeout_s, self.backend = case, timeout_s, backend
        module = "spbench.memory.probe" if backend == "single" else "spbench.memory.distprobe"
        self.command = command or [sys.executable, "-m", module]

    def argv(self, length: int) -> list[str]:
        s = self.case.setup
        single = self.backend == "single"  # one GPU: the runtime's attention (kernel auto), as `ours` trains
        spec = StepSpec(s.model, s.stage, length, s.features, attention="runtime" if single else "auto",
                        steps=1 if single else 2, finetuning=s.finetuning, lora_rank=s.lora_rank)
        args = [*step_flags(spec), "--gpu-mem-gib", str(s.gpu_mem_gib)]
        if self.backend != "single":
            args += ["--nproc", str(s.gpus), "--sp", str(s.sp), "--method", s.sp_method, "--zero", str(s.zero),
                     "--offload", ",".join(sorted(s.offload)) or "none", "--backend", self.backend,
                     "--timeout", f"{self.timeout_s:g}"]
        return [*self.command, *args]

    def __call__(self, length: int) -> dict:
        t0 = time.monotonic()
        try:
            proc = subprocess.run(self.argv(length), capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "oom": False, "error": f"probe exceeded {self.timeout_s:g} s",
                    "wall_s": time.monotonic() - t0}
        result = last_json(proc.stdout)
        if result is None:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            result = {"status": "error", "oom": False, "error": f"exit {proc.returncode}, no JSON: {tail[0][:300]}"}
        result.setdefault("status", "error")
        result["wall_s"] = time.monotonic() - t0
        return result


