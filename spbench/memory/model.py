"""Analytic per-GPU peak-memory model of one SFT or DPO training step, full-parameter or LoRA.

The peak is the largest of four phases of a step, each a sum of named terms (bytes per GPU):

  reference  (DPO) static + the frozen reference model's no-grad forward (nothing stored)
  loss       static + checkpointed hidden states + final norm + logits/log-softmax and its gradient
  layers     static + one layer's recompute + backward (SP buffers in attention), checkpoints or the gradients
             (and tied embeddings' lm_head gradient, waiting for the embedding's)
  step       static + gradients + the optimizer's temporaries

Static memory follows the optimizer setup: `zero=0` is no DeepSpeed, torch AdamW on the bf16
weights (states in bf16: 2+2+2+2 B/param, every GPU a replica; the measured plain runs);
`zero=2|3` is DeepSpeed bf16 mixed precision (fp32 master + fp32 m, v: 12 B/param, sharded over
all GPUs; ZeRO-3 also shards the bf16 weights), `offload` moves optimizer states / weights to CPU.
With LoRA (`Setup.finetuning`) gradients, optimizer states and step temporaries are
sized by the adapters' parameters only, and DPO has no reference model (its reference is the policy with adapters
disabled); activations are as for full training (LoRA's r-wide ones are neglected, see terms.py).
Activations scale with the tokens one GPU holds, n = rows × ceil(length / sp) (DPO: rows = 2,
chosen + rejected, `length` per sequence). The terms and their constants are in memory/terms.py, the setup in memory/setup.py.

Calibrated against reports/measurements/h200-2026-11-28-plain.json (tests/test_memmodel.py):
every constant in terms.py says where it comes from. The model is monotone in length, which
`maxlen_estimate` relies on for its bisection.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from runtime.memory import MemoryFeatures

from ..common.schemas import MEASUREMENTS as MEASUREMENTS_SCHEMA
from ..common.units import GiB
from .attnterms import cuda_kernel_bytes, sp_buffer_bytes
from .setup import Setup, Shape, shape_of, tokens_per_gpu, usable_bytes
from .terms import (
    ACT,
    checkpoint_bytes,
    final_hidden_bytes,
    gathered_param_bytes,
    grad_bytes,
    host_bytes,
    layer_backward_bytes,
    loss_bytes,
    optimizer_bytes,
    param_bytes,
    reference_forward_bytes,
    reference_param_bytes,
    step_temp_bytes,
    tied_head_grad_bytes,
    workspace_bytes,
)


# ------------------------------------------------------------------------------------------ the model
def peak_memory(setup: Setup, length: int, shape: Shape | None = None) -> dict:
    """Predicted peak device memory of one training step at `length` tokens per sequence.

    Returns {"total_gib", "phase" (the phase that peaks), "phases": {phase: GiB}, "terms": {term: GiB},
    "host_gib" (CPU memory per rank), "tokens_per_gpu", "fits" (total ≤ usable memory of the GPU)}.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    s, m = setup, shape or shape_of(setup.model)
    n = tokens_per_gpu(s, length)
    states = 0.0 if (s.first_step and s.zero == 0) else optimizer_bytes(s, m)
    t = {
        "params": param_bytes(s, m),
        "reference_params": reference_param_bytes(s, m),
        "gathered_params": gathered_param_bytes(s, m),
        "optimizer_states": states,
        "workspace": workspace_bytes(),
        "grads": grad_bytes(s, m),
        "tied_head_grad": tied_head_grad_bytes(s, m),
        "step_temp": step_temp_bytes(s, m),
        "checkpoints": checkpoint_bytes(s, m, n),
        "checkpoint_one_layer": n * m.hidden * ACT if s.features.gradient_checkpointing else 0.0,
        "final_hidden": final_hidden_bytes(s, m, n),
        "loss": loss_bytes(s, m, n),
        "layer_backward": layer_backward_bytes(s, m, n),
        "sp_buffers": sp_buffer_bytes(s, m, n),  # in layer_backward, as the next one
        "cuda_kernel": cuda_kernel_bytes(s, m, n),
        "reference_forward": reference_forward_bytes(s, m, n),
    }
    base = t["params"] + t["reference_params"] + t["gathered_params"] + t["optimizer_states"] + t["workspace"]
    # DeepSpeed allocates its gradient partition and bucket up front; zero 0 grads appear during backward
    early = t["grads"] if s.zero else 0.0
    late = 0.0 if s.zero else t["grads"]
    phases = {
        "reference": base + early + t["reference_forward"] if s.stage == "dpo" else 0.0,
        "loss": base + early + t["checkpoints"] + t["final_hidden"] + t["loss"],
        # the SP buffers are part of layer_backward's attention sub-phase; at the end of a ZeRO-0 backward one
        # layer's checkpoint is left beside the full gradients
        "layers": base + early + t["tied_head_grad"] + t["layer_backward"] + max(t["checkpoints"], t["checkpoint_one_layer"] + late if late else 0.0),
        "step": base - t["optimizer_states"] + optimizer_bytes(s, m) + t["grads"] + t["step_temp"],
    }
    phase = max(phases, key=phases.get)
    total = phases[phase]
    return {
        "total_gib": total / GiB,
        "phase": phase,
        "phases": {k: v / GiB for k, v in phases.items()},
        "terms": {k: v / GiB for k, v in t.items()},
        "host_gib": host_bytes(s, m, n) / GiB,
        "tokens_per_gpu": n,
        "fits": total <= usable_bytes(s.gpu_mem_gib),
    }


def maxlen_estimate(model: str, stage: str, gpus: int, gpu_mem_gib: float, sp: int, zero: int,
                    offload=frozenset(), features: MemoryFeatures | None = None, *, sp_method: str = "auto",
                    resolution: int = 1024, cap: int = 2**28) -> int:
    """Largest length (per sequence, a multiple of `resolution`) whose predicted peak fits the GPU; 0 if even
    `resolution` tokens do not fit. Bisection over the monotone model between `resolution` and `cap`."""
    setup = Setup(model, stage, gpus, gpu_mem_gib, sp, zero, frozenset(offload),
                  features if features is not None else MemoryFeatures(), sp_method)
    return maxlen_for(setup, resolution=resolution, cap=cap)


def maxlen_for(setup: Setup, *, resolution: int = 1024, cap: int = 2**28) -> int:
    """`maxlen_estimate` for a `Setup`."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    shape = shape_of(setup.model)
    fits = lambda k: peak_memory(setup, k * resolution, shape)["fits"]  # noqa: E731
    lo, hi = 0, cap // resolution + 1  # lo fits (0 trivially), hi does not (or is past the cap)
    if fits(hi - 1):
        return (hi - 1) * resolution
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * resolution


def with_features(setup: Setup, **changes) -> Setup:
    """A copy of `setup` whose MemoryFeatures have `changes` applied."""
    return replace(setup, features=replace(setup.features, **changes))


# --------------------------------------------------------------------------- checking against measurements
MEASUREMENTS = Path(__file__).resolve().parents[2] / "reports" / "measurements"
"""The stored GPU measurements of a checkout (reports/ is not installed with the package)."""


def compare_measurements(path: str | Path) -> list[dict]:
    """Predicted vs measured for every point of a measurements file (schema spbench.measurements/1).

    One dict per point: model, stage, length, oom, regime, measured_gib, predicted_gib (the point's regime),
    error (predicted / measured − 1; None for OOM points), predicted_fits (on the file's GPU).
    """
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != MEASUREMENTS_SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r} is not {MEASUREMENTS_SCHEMA}")
    st = doc["setup"]
    # a feature the file does not name was not used: measured runs are plain transformers plus what the file lists
    features = replace(MemoryFeatures.plain(), **st["features"])
    rows = []
    for p in doc["points"]:
        regime = p.get("regime", "steady")
        setup = Setup(p["model"], p["stage"], st["gpus"], st["gpu_mem_gib"], st["sp"], st["zero"],
                      frozenset(st["offload"]), features, first_step=regime == "first_step")
        pred = peak_memory(setup, p["length"])
        meas = p.get("peak_gib")
        rows.append({"model": p["model"], "stage": p["stage"], "length": p["length"], "oom": bool(p["oom"]),
                     "regime": regime, "measured_gib": meas, "predicted_gib": pred["total_gib"],
                     "phase": pred["phase"], "error": None if meas is None else pred["total_gib"] / meas - 1,
                     "predicted_fits": pred["fits"]})
    return rows
