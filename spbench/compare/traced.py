"""Traced max lengths of the implementations whose training step runs on fake tensors (`spbench compare
--trace-memory`): the runtime's own step (spbench/memory/traced.py) and DeepSpeed ALST's (compare/alst_trace.py).

Each implementation's compare/memory.toml setup, WITHOUT checkpoint offload (ALST's offload is not traced:
alst_trace.py), is searched as `spbench maxlen --trace search` does: every probe length is one step traced on SP rank
0 (2 and 3 decoder layers, extrapolated), composed with ZeRO's static terms from the memory model, "ok" when it fits
the 80 GB GPU's usable memory; bracket from the model's estimate, bisect to RESOLUTION tokens. The row holds the
traced max length beside the model's estimate for the same setup, and the model's error at the traced length.
"""
from __future__ import annotations

import sys

from ..common.units import GiB
from ..memory.setup import usable_bytes
from .estimate import base_name, memory_features, setup_of

RESOLUTION = 16384
"""Tokens per sequence between the last fitting and the first failing probe (8 probes or so per implementation)."""


def _spbench_trace(setup, length: int) -> dict:
    from ..memory.depth import extrapolated_peak
    from ..memory.traced import spec_for

    return extrapolated_peak(spec_for(setup, length))


def _alst_trace(setup, length: int) -> dict:
    from .alst_trace import alst_extrapolated

    return alst_extrapolated(setup.model, length, setup.sp)


TRACERS = {"spbench": _spbench_trace, "deepspeed-alst": _alst_trace}
"""Implementation (base name) → its step traced at a length: memory/trace.py's state-free fields."""


def traced_row(impl: str, log=print) -> dict:
    """One implementation's traced max length (module doc): {"impl", "model", "setup" (features), "max_len",
    "estimated_max_len", "traced_gib", "model_gib", "error" (model / traced − 1 at max_len), "peak_phase",
    "layers_traced", "probes", "trace_s", "resolution", "source"}."""
    from ..memory.model import maxlen_for
    from ..memory.search import search_max_len
    from ..memory.traced import composed_peak, depth_label
    from .estimate import features_cell

    entry = {**memory_features()[impl], "checkpoint_offload": False}
    setup, trace = setup_of(entry), TRACERS[impl]
    usable = usable_bytes(setup.gpu_mem_gib) / GiB

    def probe(length: int) -> dict:
        r = composed_peak(setup, length, trace(setup, length))
        log(f"compare: {impl} traced at {length:,}: {r['traced_gib']:.1f} GiB (usable {usable:.1f})")
        return {**r, "status": "ok" if r["fits"] else "exceeds"}

    estimated = maxlen_for(setup)
    outcome = search_max_len(probe, max(estimated, RESOLUTION), RESOLUTION)
    best = outcome.best or {}
    return {"impl": impl, "model": setup.model, "setup": features_cell(entry), "max_len": outcome.max_len,
            "estimated_max_len": estimated, "traced_gib": best.get("traced_gib"), "model_gib": best.get("model_gib"),
            "error": best.get("error"), "peak_phase": best.get("peak_phase"),
            "layers_traced": depth_label(best["trace"]) if best else None, "probes": len(outcome.probes),
            "trace_s": round(sum(p["trace_s"] for p in outcome.probes), 1), "resolution": RESOLUTION,
            "source": "traced on CPU (fake tensors; ZeRO's static terms from the memory model)"}


def traced_rows(impls) -> dict[str, dict]:
    """{implementation: traced_row} for the names in `impls` whose step can be traced (by base name)."""
    bases = sorted({base_name(n) for n in impls} & set(TRACERS))
    return {b: traced_row(b, log=lambda m: print(m, file=sys.stderr, flush=True)) for b in bases}
