"""Depth-extrapolated traces: the trainer's step traced at 2 and 3 decoder layers, extended linearly to the model's.

A fake-tensor trace costs time per op, and a deep model at millions of tokens runs ~10⁴ ops per layer (tiled MLP,
RMSNorm and loss chunks, ring steps): a 72B step (80 layers) would take an hour. Every decoder layer is the same,
so what a ZeRO setup takes from the trace — the peak of everything but parameters, gradients and optimizer
states (memory/traced.py) — is, in each phase of the step, linear in the depth L:

* forward and backward: the checkpoints (one hidden state per layer, on the device or, offloaded, on the host)
  grow by the same bytes per layer; the rest (one layer's working set, SP buffers, the loss's chunk) does not
  depend on L. The phase's peak is where every checkpoint is alive (the top layer's backward, or the loss), for
  any L ≥ 2, so it is a line in L;
* the optimizer: AdamW's foreach temporaries, proportional to the parameters, a line in L too.

`extrapolated_peak` traces the step at depths 2 and 3 and returns memory/trace.py's dict with every state-free
and host field at depth L: X(L) = X(3) + (L − 3)·(X(3) − X(2)), per phase, the maximum over phases after. It
checks its premise — each phase's state-free peak in the same module and op at both depths, its layer index
counted from the top — and traces at full depth where it fails.

The device totals (parameters, gradients and states included) are NOT extrapolated: with a full replica the
gradients grow through the backward while the checkpoints shrink, so the total peaks at the top or the bottom
layer depending on L (Llama-3.1-8B, 393k tokens, SP 8: the 2- and 3-layer steps peak in attention, the 4-layer
one in the optimizer). They are None in the dict; a setup without ZeRO is traced at full depth (traced.py).
tests/test_depth.py holds the extrapolation equal to a full-depth trace, byte for byte.
"""
from __future__ import annotations

import re

from runtime.models import model_config

from .step import StepSpec
from .trace import traced_peak

DEPTHS = (2, 3)
"""The two depths traced (the lower one ≥ 2: a 1-layer model's only layer is also its first, embedding and all)."""

TRACE_DEPTHS = ("extrapolated", "full")
"""How deep a ZeRO setup's step is traced: at DEPTHS, extrapolated (module doc), or at the model's full depth."""

LINEAR_FIELDS = ("attention_state_free_peak_gib", "host_peak_gib")
DEVICE_TOTALS = ("peak_bytes", "peak_gib", "attention_peak_gib", "phase_peak_gib", "by_category_gib", "peak_phase",
                 "peak_where")
_LAYER = re.compile(r"layers\.(\d+)")


def at_depth(where: str, depth: int, layers: int) -> str:
    """`where` (a trace's "phase, module: op") of a `depth`-layer trace renamed for a `layers`-layer model: the
    first layer stays layers.0, layer i ≥ 1 becomes layers.(i + layers − depth), so the top layer stays the top.
    E.g. ("backward, ...layers.2.self_attn: op", 3, 28) → "backward, ...layers.27.self_attn: op"."""
    return _LAYER.sub(lambda m: f"layers.{int(m[1]) + (layers - depth if int(m[1]) else 0)}", where)


def extrapolate(low: dict, high: dict, layers: int) -> dict:
    """memory/trace.py's dict at `layers` decoder layers from traces `low` and `high` at depths `low["layers"]` and
    `low["layers"] + 1`: state-free and host fields extrapolated (per phase), device totals None (module doc).
    ValueError when the state-free peak is not in the same place at both depths."""
    d_low, d_high = low["layers"], high["layers"]
    if d_high != d_low + 1:
        raise ValueError(f"depths {d_low} and {d_high}: extrapolation takes two traces one layer apart")
    if at_depth(low["state_free_where"], d_low, d_high) != high["state_free_where"]:
        raise ValueError(f"the state-free peak moved between {d_low} and {d_high} layers "
                         f"({low['state_free_where']!r} vs {high['state_free_where']!r}); trace at full depth")
    extra = layers - d_high

    def line(a: float, b: float) -> float:
        return b + extra * (b - a)

    phases = {p: line(low["phase_state_free_peak_gib"].get(p, 0.0), v)
              for p, v in high["phase_state_free_peak_gib"].items()}
    top = max(phases, key=phases.get)
    where = at_depth(high["state_free_where"], d_high, layers)
    return {**high, **dict.fromkeys(DEVICE_TOTALS), **{k: line(low[k], high[k]) for k in LINEAR_FIELDS},
            "phase_state_free_peak_gib": phases, "state_free_peak_gib": phases[top],
            "state_free_where": where if where.startswith(top) else f"{top} (extrapolated)", "layers": layers,
            "depth": {"traced": [d_low, d_high], "extrapolated_to": layers},
            "trace_s": low["trace_s"] + high["trace_s"]}


def extrapolated(trace_at, layers: int) -> dict:
    """`extrapolate` of `trace_at(depth)` (a memory/trace.py-style dict of a step at that many decoder layers) at
    DEPTHS, to `layers`; the one place any step (the runtime's, compare/alst_trace.py's) is traced at reduced depth."""
    low, high = (trace_at(d) for d in DEPTHS)
    return extrapolate(low, high, layers)


def extrapolated_peak(spec: StepSpec, rank: int = 0, layers: int | None = None) -> dict:
    """memory/trace.py's traced_peak of `spec` at `layers` decoder layers (default the model's), from traces at
    DEPTHS (module doc: device totals None); a full-depth trace where the model is no deeper than DEPTHS or the
    premise fails (then "depth" says why)."""
    layers = layers or model_config(spec.model).num_hidden_layers
    if layers <= DEPTHS[-1]:
        return traced_peak(spec, rank, layers=layers)
    try:
        return extrapolated(lambda d: traced_peak(spec, rank, layers=d), layers)
    except ValueError as e:
        full = traced_peak(spec, rank, layers=layers)
        return {**full, "depth": {"traced": [layers], "why_full": str(e)}}
