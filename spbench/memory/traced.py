"""Traced peaks of a memory-model `Setup`: the trainer's step traced on CPU (memory/trace.py), composed with the
model's terms for what a fake-tensor trace cannot run.

`traced_setup_peak(setup, length)` traces ONE `Trainer.step` of the setup on the SP rank that peaks (without
DeepSpeed; `peak_ranks`) and returns the device peak it implies. Which parts are traced and which come from the model:

* no ZeRO, no parameter/optimizer offload: everything but the CUDA workspace term (memory/terms.py WORKSPACE_GIB)
  is the trace: weights, gradients, AdamW states and its step, activations, SP buffers, checkpoints (offloaded
  ones counted as host memory), logits, DPO's reference forward.
* DeepSpeed ZeRO-2/3, offload: DeepSpeed does not run on fake tensors. The trace, run as a full replica, gives the
  peak of everything but parameters, gradients and optimizer states (`state_free_peak_gib`); the model gives the
  static terms the ZeRO setup holds through the step (resident and gathered parameters, the reference's, optimizer
  states, the gradient partition and bucket, workspace), and the optimizer step's phase as a whole.
* The attention kernel: the trace runs the CPU kernel (GQA native, no workspace); a GPU runs a CUDA kernel that
  expands K/V for GQA and keeps an fp32 dq accumulator. Those bytes (memory/terms.py cuda_kernel_bytes, derived,
  not traced) join the trace's attention-backward peak, listed as "cuda_kernel" (a Setup with
  attention_kernel="cpu-flash" adds none).

Depth (`depth`, memory/depth.py): a ZeRO setup's step is traced at 2 and 3 decoder layers and extrapolated
to the model's depth ("extrapolated", byte-exact against full-depth traces), or at full depth ("full"); a
setup without ZeRO always at full depth (its device total is not linear in depth).

Ranks: for unpacked full-length rows (the maxlen data) every SP rank holds tensors of the same shapes outside the
attention; a blockwise attention's (ring, zigzag, the hybrid's ring, allgather) kernel calls and K/V blocks differ by
the rank's place in the ring, and the first and the last place are the extremes (contiguous ring: rank 0 computes its
diagonal block only, the last rank a full block at every step; zigzag: rank 0 every block's second half of queries
against whole key blocks, the last rank whole query blocks against halves): both are traced and the larger peak
counts (tests/test_traced.py traces every rank and finds the peak at one of the two). Ulysses: rank 0.
LoRA: the base model is fake, its adapters (r-wide) real tensors (runtime/lora.py): peft cannot move a fake adapter.
"""
from __future__ import annotations

from collections.abc import Callable

from ..common.units import GiB
from .attnterms import blockwise
from .depth import TRACE_DEPTHS, extrapolated_peak
from .model import peak_memory
from .setup import Setup, usable_bytes
from .step import StepSpec
from .trace import traced_peak

ZERO_STATIC_TERMS = ("params", "reference_params", "gathered_params", "optimizer_states", "grads", "workspace")
"""The model's terms a ZeRO setup's traced peak takes from the model (memory/model.py names)."""


class NotTraceable(ValueError):
    """This setup cannot be traced on fake tensors (the message says why)."""


def spec_for(setup: Setup, length: int) -> StepSpec:
    """The StepSpec of one step of `setup` at `length` tokens per sequence, as the trace runs it (no DeepSpeed)."""
    if setup.batch != 1:
        raise NotTraceable(f"batch {setup.batch}: the traced step holds one sequence (DPO: pair) per micro-batch")
    if setup.finetuning == "lora" and setup.lora_target != "all":
        raise NotTraceable(f"lora_target {setup.lora_target!r}: the traced step adapts every decoder linear (all)")
    return StepSpec(setup.model, setup.stage, length, setup.features, dtype="bfloat16", device="cpu",
                    nproc=setup.sp, sp=setup.sp, method=setup.sp_method, finetuning=setup.finetuning,
                    lora_rank=setup.lora_rank)


def from_model(setup: Setup) -> tuple[str, ...]:
    """The model terms that `traced_setup_peak` adds to the trace for `setup` (module doc)."""
    kernel = () if setup.attention_kernel == "cpu-flash" else ("cuda_kernel",)
    if setup.zero == 0 and not setup.offload:
        return ("workspace", *kernel)
    return (*ZERO_STATIC_TERMS, "step phase", *kernel)


def peak_ranks(setup: Setup) -> tuple[int, ...]:
    """The SP ranks whose traces bound every rank's peak (module doc): rank 0, and the last for blockwise attention."""
    return (0, setup.sp - 1) if blockwise(setup) else (0,)


def traced_setup_peak(setup: Setup, length: int, rank: int | None = None, depth: str = "full",
                      progress: Callable[[str], None] | None = None) -> dict:
    """The traced device peak of `setup` at `length` (module doc; `depth`: "extrapolated" or "full") beside the
    model's prediction.

    Returns {"length", "traced_gib", "model_gib", "error" (model / traced − 1), "fits" (traced ≤ the GPU's usable
    memory), "from_model" (model terms added), "peak_phase", "host_gib" (offloaded checkpoints, traced),
    "depth" (the layers traced: "28" or "2,3→28"), "rank" (the SP rank that peaks), "trace_s" (every rank's
    traces), "trace" (memory/trace.py's dict)}. `rank`: trace that SP rank only (default `peak_ranks`);
    `progress(line)`: told as each rank's trace ends (a 0.5B trace at 20M tokens takes half an hour)."""
    if depth not in TRACE_DEPTHS:
        raise ValueError(f"depth {depth!r}: use one of {', '.join(TRACE_DEPTHS)}")
    spec = spec_for(setup, length)
    zero = from_model(setup)[0] != "workspace"
    return peak_over_ranks(setup, length, lambda r: extrapolated_peak(spec, r) if zero and depth == "extrapolated"
                           else traced_peak(spec, r), None if rank is None else (rank,), progress)


def peak_over_ranks(setup: Setup, length: int, trace_of: Callable[[int], dict],
                    ranks: tuple[int, ...] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """`composed_peak` of the SP rank that peaks among `ranks` (default `peak_ranks(setup)`), with "rank" (whose)
    and "trace_s" (every rank's traces); `trace_of(rank)`: memory/trace.py's dict of that rank's step."""
    peaks = {}
    for r in ranks or peak_ranks(setup):
        peaks[r] = composed_peak(setup, length, trace_of(r))
        if progress:
            progress(f"SP rank {r} traced at {length:,}: {peaks[r]['traced_gib']:.2f} GiB in {peaks[r]['trace_s']:.0f} s")
    top = max(peaks, key=lambda r: peaks[r]["traced_gib"])
    return {**peaks[top], "rank": top, "trace_s": sum(p["trace_s"] for p in peaks.values())}


def depth_label(trace: dict) -> str:
    """The layers a trace ran: "28" (full depth) or "2,3→28" (memory/depth.py's extrapolation)."""
    d = trace.get("depth") or {}
    return (f"{','.join(map(str, d['traced']))}→{d['extrapolated_to']}" if "extrapolated_to" in d
            else str(trace.get("layers", "full")))


def composed_peak(setup: Setup, length: int, trace: dict) -> dict:
    """`traced_setup_peak`'s dict from a trace (memory/trace.py's dict) of `spec_for(setup, length)`. The CUDA
    kernel's own bytes (memory/terms.py cuda_kernel_bytes) join the trace's attention-backward peak."""
    pred = peak_memory(setup, length)
    terms = from_model(setup)
    kernel = pred["terms"]["cuda_kernel"]
    if terms[0] == "workspace":
        ws = pred["terms"]["workspace"]
        traced = max(trace["peak_gib"], trace["attention_peak_gib"] + kernel) + ws
        phase = trace["peak_phase"] if traced == trace["peak_gib"] + ws else "backward (attention)"
    else:
        static = sum(pred["terms"][t] for t in ZERO_STATIC_TERMS)
        free = max(trace["state_free_peak_gib"], trace["attention_state_free_peak_gib"] + kernel)
        traced = max(static + free, pred["phases"]["step"])
        if traced > static + free:  # the optimizer step, with ZeRO's partitions: the model's phase
            phase = "step (model)"
        elif free > trace["state_free_peak_gib"]:  # the CUDA kernel's bytes at an attention backward call
            phase = "backward (attention)"
        else:
            phase = trace["state_free_where"].split(", ")[0]
    return {"length": length, "traced_gib": traced, "model_gib": pred["total_gib"],
            "error": pred["total_gib"] / traced - 1, "fits": traced * GiB <= usable_bytes(setup.gpu_mem_gib),
            "from_model": list(terms), "peak_phase": phase, "model_phase": pred["phase"],
            "host_gib": trace["host_peak_gib"], "depth": depth_label(trace), "trace_s": trace["trace_s"],
            "trace": trace}


class TraceProbe:
    """A `search_max_len` probe (memory/search.py) that traces instead of running on a GPU: "ok" when the traced
    peak fits the setup's GPU, else "exceeds"; never raises for a length (a trace error is an "error" probe)."""

    def __init__(self, setup: Setup, depth: str = "full", progress: Callable[[str], None] | None = None) -> None:
        self.setup, self.depth, self.progress = setup, depth, progress

    def check(self) -> None:
        """Raise NotTraceable (why) if this setup cannot be traced, before any probe runs."""
        spec_for(self.setup, 1)

    def __call__(self, length: int) -> dict:
        try:
            r = traced_setup_peak(self.setup, length, depth=self.depth, progress=self.progress)
        except Exception as e:  # noqa: BLE001 — a failed trace is a failed probe, with its reason
            return {"status": "error", "error": f"{type(e).__name__}: {e}"}
        usable = usable_bytes(self.setup.gpu_mem_gib) / GiB
        return {"status": "ok" if r["fits"] else "exceeds", "peak_gib": r["traced_gib"], "model_gib": r["model_gib"],
                "usable_gib": usable, "from_model": r["from_model"], "peak_phase": r["peak_phase"],
                "host_gib": r["host_gib"], "trace_depth": r["depth"], "trace_s": r["trace_s"],
                **({} if r["fits"] else {"error": f"traced peak {r['traced_gib']:.1f} GiB > usable {usable:.1f} GiB"})}


def check_row(row: dict, setup: Setup, depth: str = "full", progress: Callable[[str], None] | None = None) -> dict:
    """`row` (an estimated maxlen row) with the trace at its max length beside the model: traced_gib, trace_error
    (model / traced − 1), traced_phase, from_model, trace_depth, trace_s; or trace_skipped (why not)."""
    if not row["max_len"]:
        return {**row, "trace_skipped": "nothing fits: no length to trace"}
    try:
        r = traced_setup_peak(setup, row["max_len"], depth=depth, progress=progress)
    except NotTraceable as e:
        return {**row, "trace_skipped": str(e)}
    return {**row, "traced_gib": r["traced_gib"], "trace_error": r["error"], "traced_phase": r["peak_phase"],
            "traced_where": r["trace"]["peak_where"] if r["from_model"][0] == "workspace" else r["trace"]["state_free_where"],
            "traced_host_gib": r["host_gib"], "from_model": r["from_model"], "trace_depth": r["depth"],
            "traced_rank": r["rank"], "trace_s": round(r["trace_s"], 1)}
