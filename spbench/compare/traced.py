"""Traced max lengths of the implementations whose training step runs on fake tensors (`spbench compare
--trace-memory`): the runtime's own step (spbench/memory/traced.py) and DeepSpeed ALST's (compare/alst_trace.py:
tiled for deepspeed-alst; its attention in a plain transformers step for deepspeed-alst-attention and for HF's
Trainer path, hf-accelerate-sp, whose loss is the model's own under SP).

ms-swift's and verl's attention are traced in the harness's step (TRACERS), in their own venvs: a merge carries
their rows from the input runs. Each implementation's compare/memory.toml setup, WITHOUT checkpoint offload (ALST's offload is not traced:
alst_trace.py), is searched as `spbench maxlen --trace search` does: every probe length is one step traced on SP rank
0 (2 and 3 decoder layers, extrapolated), composed with ZeRO's static terms from the memory model, "ok" when it fits
the 80 GB GPU's usable memory; bracket from the model's estimate, bisect to RESOLUTION tokens. The row holds the
traced max length beside the model's estimate for the same setup, and the model's error at the traced length.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..common.units import GiB
from ..memory.setup import usable_bytes
from .estimate import base_name, memory_features, setup_of

RESOLUTION = 16384
"""Tokens per sequence between the last fitting and the first failing probe (8 probes or so per implementation)."""

TRACED_ON_CPU = "traced on CPU (fake tensors; ZeRO's static terms from the memory model)"


@dataclass(frozen=True)
class Tracer:
    trace: Callable[..., dict]
    """(setup, length) → memory/trace.py's state-free fields of the implementation's step at that length."""
    package: str | None = None
    """The package the trace imports (installed in the implementation's own venv); None: always here."""
    source: str = TRACED_ON_CPU
    """What was traced, for the report's "traced in" column."""


def _spbench_trace(setup, length: int) -> dict:
    from ..memory.depth import extrapolated_peak
    from ..memory.traced import spec_for

    return extrapolated_peak(spec_for(setup, length))


def _alst_trace(setup, length: int, tiled: bool = True) -> dict:
    from .alst_trace import alst_extrapolated

    return alst_extrapolated(setup.model, length, setup.sp, tiled=tiled)


def _attention_trace(package: str, rank_setup: str) -> Tracer:
    """The harness's step with an adapter's attention swapped in (`rank_setup`: the name of its rank setup in
    compare/<package>.py), traced as the runtime's is; needs `package` installed (its own venv)."""

    def trace(setup, length: int) -> dict:
        from runtime.models import model_config

        from ..memory.depth import extrapolated
        from ..memory.trace import traced_peak
        from ..memory.traced import spec_for

        use = getattr(importlib.import_module(f"spbench.compare.{package}"), rank_setup)
        spec = spec_for(setup, length)
        return extrapolated(lambda d: traced_peak(spec, 0, layers=d, setup=use),
                            model_config(setup.model).num_hidden_layers)

    return Tracer(trace, package, f"its attention traced in the harness's step on CPU (fake tensors; {package}'s "
                                  f"own trainer not run; ZeRO's static terms from the memory model)")


_alst_untiled = partial(_alst_trace, tiled=False)
ALST_PLAIN = ("ALST's attention in transformers' model with its own loss, as HF's Trainer runs it under SP "
              "(compare/alst_trace.py tiled=False; on CPU, fake tensors; ZeRO's static terms from the memory model)")

TRACERS = {"spbench": Tracer(_spbench_trace), "deepspeed-alst": Tracer(_alst_trace),
           "deepspeed-alst-attention": Tracer(_alst_untiled, source=ALST_PLAIN),
           "hf-accelerate-sp": Tracer(_alst_untiled, source=ALST_PLAIN),
           "ms-swift-ulysses": _attention_trace("swift", "use_swift_attention"),
           "verl-ulysses-sdpa": _attention_trace("verl", "use_verl_all_to_all_sdpa")}
"""Implementation (base name) → how its step is traced at a length. ms-swift's and
verl's own trainers do not run here: their attention is traced inside the harness's step with their memory.toml
features (transformers' modules, untiled loss), as their parity verdicts run."""


def traceable_here(impl: str) -> bool:
    """Whether `impl`'s step can be traced in this venv (its package installed)."""
    tracer = TRACERS.get(impl)
    return tracer is not None and (tracer.package is None or importlib.util.find_spec(tracer.package) is not None)


def traced_entry(impl: str) -> dict:
    """`impl`'s memory.toml entry as it is traced: without checkpoint offload (module doc)."""
    return {**memory_features()[impl], "checkpoint_offload": False}


def traced_step(impl: str) -> tuple:
    """(Tracer, Setup) of what `impl`'s traced row searches."""
    return TRACERS[impl], setup_of(traced_entry(impl))


def traced_row(impl: str, log=print) -> dict:
    """One implementation's traced max length (module doc): {"impl", "model", "setup" (features), "max_len",
    "estimated_max_len", "traced_gib", "model_gib", "error" (model / traced − 1 at max_len), "peak_phase",
    "layers_traced", "probes", "trace_s", "resolution", "source"}."""
    from ..memory.model import maxlen_for
    from ..memory.search import search_max_len
    from ..memory.traced import composed_peak, depth_label
    from .estimate import features_cell

    entry = traced_entry(impl)
    setup, tracer = setup_of(entry), TRACERS[impl]
    usable = usable_bytes(setup.gpu_mem_gib) / GiB

    def probe(length: int) -> dict:
        r = composed_peak(setup, length, tracer.trace(setup, length))
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
            "source": tracer.source}


def traced_rows(impls, carried: dict | None = None, only: set[str] | None = None) -> dict[str, dict]:
    """{implementation: traced_row} for the names in `impls` (by base name; `only`: those of them) whose step can
    be traced in this venv; `carried` (traced rows of the input runs, traced in their own venvs) keeps the rest."""
    bases = {base_name(n) for n in impls}
    here = sorted(b for b in bases if traceable_here(b) and (only is None or b in only))
    rows = {b: row for b, row in (carried or {}).items() if b in bases and b not in here}
    searched: list[tuple[tuple, dict]] = []
    for b in here:
        # the same tracer on the same setup (HF's Trainer path and ALST's attention alone) is one search, not two
        step = traced_step(b)
        twin = next((row for s, row in searched if s == step), None)
        rows[b] = {**twin, "impl": b} if twin else traced_row(b, log=lambda m: print(m, file=sys.stderr, flush=True))
        searched.append((step, rows[b]))
    return rows
