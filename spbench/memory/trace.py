"""Traced peak memory of the trainer's step, on CPU, without allocating it.

`traced_peak` builds the trainer (memory/step.py, the step `spbench train` runs) under `FakeTensorMode`:
weights, optimizer states and activations are fake tensors (shapes and dtypes, no storage). The data is
built first, outside the fake mode (it is Python lists and small CPU tensors). AdamW's states are primed, and
ONE `Trainer.step` (forward, backward, clipping, AdamW step; DPO's reference forward first) runs under
`torch.distributed._tools.mem_tracker.MemTracker`, which adds up the bytes of every live tensor storage after
each op and keeps the peak. It checks the analytic model (memory/model.py) for feature sets that have no GPU
measurement yet.

How it differs from a GPU run (spbench.memory.probe):
* The step reads no value back (`read_back=False`: fake tensors have none).
* Attention is the trainer's choice at SP 1 (transformers' "sdpa" without packing) on fake CPU tensors, in
  the requested dtype: `aten._scaled_dot_product_flash_attention_for_cpu` (out + fp32 LSE, no [s × s]
  matrix); the op names seen are returned under "attention_ops". The attention kernel's own workspace is not
  modelled (fake kernels allocate outputs only), nor are cuBLAS/cuDNN workspaces: compare with the analytic
  total minus its `workspace` term.
* AdamW is the trainer's foreach implementation, the CUDA default.
* Every tensor is on the fake CPU device, so checkpoint offload (device → host copies) cannot be told
  apart from device memory: it is refused; so is DeepSpeed (its engine does not run on fake tensors).
* Bytes are exact storage sizes; no caching-allocator rounding or fragmentation, no CUDA context.

MemTracker (torch 2.13) is used through a subclass that (1) keeps only the global peak in
`_update_peak_stats` (the stock method walks every module's stats after every op: ~5× slower) and records
the phase of the peak, (2) tolerates a module called more than once at top level (the tiled loss calls
`lm_head` once per chunk; stock MemTracker raises, taking it for a second iteration; only per-module
snapshots, which are not used here, are affected), and (3) installs no gradient hooks on a frozen module (the
DPO reference; stock MemTracker raises). None of these changes what is counted.

    python -m spbench.memory.trace --model qwen2.5-0.5b --length 4096 [--plain] [--stage dpo]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from runtime.config import DTYPES, from_dict
from runtime.memory import MemoryFeatures
from runtime.models import model_config
from runtime.records import build_schedule, load_tokenizer
from runtime.topology import single_process_context
from runtime.train import Trainer

from ..common.schemas import MEMTRACE as SCHEMA
from ..common.units import GiB
from .step import StepSpec, add_feature_args, features_from_args, prime_optimizer


def available() -> str | None:
    """None when FakeTensorMode and MemTracker import; else why not (for skips and errors)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
        from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401
    except Exception as e:  # noqa: BLE001 — any import failure means: cannot trace here
        return f"torch {torch.__version__}: {type(e).__name__}: {e}"
    return None


def _tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        """MemTracker keeping the global peak only, with the phase it happened in (see module doc)."""

        def __init__(self) -> None:
            super().__init__()
            self.peak_phase: str | None = None
            self.phase_peaks: dict[str, int] = {}
            self.attention_ops: set[str] = set()

        def _pre_fw_hook(self, module, inputs) -> None:
            try:
                super()._pre_fw_hook(module, inputs)
            except NotImplementedError:  # repeated top-level call (tiled-loss chunks): no module stats
                pass

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            # a frozen module (the DPO reference) has no gradients to hook; stock MemTracker raises on it
            hooks = install_grad_hooks and all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks=hooks)

        def _update_peak_stats(self, peak_state) -> None:
            phase = "optimizer" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
            for dev, snap in self._curr_mem_snap.items():
                total = snap[_TOTAL_KEY]
                if total > self.phase_peaks.get(phase, 0):
                    self.phase_peaks[phase] = total
                if total > self._peak_mem.get(dev, 0):
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)
                    self.peak_phase = phase

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.__name__:
                self.attention_ops.add(func.__name__)
            return super().__torch_dispatch__(func, types, args, kwargs)

    return PeakTracker


def traced_peak(model_name: str, stage: str, length: int, features: MemoryFeatures,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Peak memory of one steady-state training step (AdamW states primed), traced on fake CPU tensors.

    Returns {"schema", "model", "stage", "length", "tokens", "dtype", "features", "peak_bytes", "peak_gib",
    "peak_phase" ("forward" | "backward" | "optimizer"), "phase_peak_gib" {phase: GiB},
    "by_category_gib" (the tensors live at the peak: param, buffer, grad, act, temp, opt, other; MemTracker
    may file recomputed activations under act or temp, the total is exact), "attention_ops", "trace_s"}.
    """
    why = available()
    if why:
        raise RuntimeError(f"cannot trace memory: {why}")
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage {stage!r} unknown; choose from sft, dpo")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if features.checkpoint_offload:
        raise ValueError("checkpoint offload cannot be traced: every fake tensor is on one CPU device, so "
                         "offloaded checkpoints would count as device memory")
    t0 = time.perf_counter()
    spec = StepSpec(model_name, stage, length, features, dtype=str(dtype).removeprefix("torch."), device="cpu")
    cfg = from_dict(spec.train_config())
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    schedule = build_schedule(cfg, 1, tokenizer, model_config(model_name).vocab_size)  # real data, not traced
    micro_batches = schedule.micro_batches(0, 0, tokenizer.pad_id)
    pc = single_process_context()  # rank arithmetic reads tensors: outside the trace too
    schedule.step_denominator(0, stage)  # the step's data order, computed (and memoised) before the trace
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the micro-batches' CPU tensors join the fake step
    tracker = _tracker_class()()
    with mode:
        trainer = Trainer(cfg, pc, schedule=schedule)
        prime_optimizer(trainer)
        frozen = [trainer.ref_model] if trainer.ref_model is not None else []
        tracker.track_external(trainer.model, trainer.optimizer, *frozen)
        with tracker:
            trainer.step(0, micro_batches=micro_batches, read_back=False)
    peak = max(tracker._peak_mem.values())
    snap = next(s for d, s in tracker._peak_mem_snap.items() if tracker._peak_mem[d] == peak)
    by_cat = {str(k.value if hasattr(k, "value") else k).lower(): v / GiB for k, v in snap.items() if k != "Total"}
    return {
        "schema": SCHEMA, "model": model_name, "stage": stage, "length": length, "tokens": spec.rows * length,
        "dtype": str(dtype).removeprefix("torch."), "features": features.to_json(),
        "peak_bytes": int(peak), "peak_gib": peak / GiB, "peak_phase": tracker.peak_phase,
        "phase_peak_gib": {k: v / GiB for k, v in tracker.phase_peaks.items()},
        "by_category_gib": by_cat, "attention_ops": sorted(tracker.attention_ops),
        "trace_s": time.perf_counter() - t0,
    }


def analytic_for(traced: dict) -> dict:
    """memmodel's prediction for the traced setup (one GPU, no ZeRO, no offload, no SP), and its error
    against the trace with and without the model's GPU-only `workspace` term (error = predicted/traced − 1)."""
    from . import model as mm

    f = traced["features"]
    features = MemoryFeatures(tiled_loss_chunk=f["tiled_loss_chunk"], tiled_mlp_chunks=f["tiled_mlp_chunks"],
                              checkpoint_offload=f["checkpoint_offload"],
                              gradient_checkpointing=f["gradient_checkpointing"])
    pred = mm.peak_memory(mm.Setup(traced["model"], traced["stage"], features=features), traced["length"])
    no_ws = pred["total_gib"] - pred["terms"]["workspace"]
    return {"analytic_gib": pred["total_gib"], "analytic_phase": pred["phase"],
            "analytic_no_workspace_gib": no_ws,
            "error": pred["total_gib"] / traced["peak_gib"] - 1,
            "error_no_workspace": no_ws / traced["peak_gib"] - 1}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spbench.memory.trace", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="preset name (a local checkpoint dir goes through build_model too; untested)")
    p.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    p.add_argument("--length", type=int, required=True, help="tokens per sequence (DPO: each of chosen, rejected)")
    p.add_argument("--plain", action="store_true", help="plain transformers: no tiling (checkpointing on)")
    add_feature_args(p)
    p.set_defaults(checkpoint_offload=False)  # cannot be traced (see above)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    features = features_from_args(args)
    if args.plain:
        features = dataclasses.replace(MemoryFeatures.plain(), gradient_checkpointing=features.gradient_checkpointing)
    out = traced_peak(args.model, args.stage, args.length, features, DTYPES[args.dtype])
    try:
        out.update(analytic_for(out))
    except Exception as e:  # noqa: BLE001 — a checkpoint dir the model cannot describe: the trace still stands
        out["analytic_error"] = f"{type(e).__name__}: {e}"
    out["torch"] = torch.__version__
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
