"""Traced peak memory of the trainer's step on one SP rank, on CPU, without allocating it.

`traced_peak(spec, rank)` runs ONE `Trainer.step` of a memory/step.py `StepSpec` (the step `spbench train` runs:
SP strategy and degree, tiled loss and MLP, checkpointing, checkpoint offload, DPO's reference forward) as SP rank
`rank` (memory/step.py `fake_step`: `FakeTensorMode`, and a fake process group whose collectives move nothing),
with AdamW's states primed, under `torch.distributed._tools.mem_tracker.MemTracker`, which adds up the bytes of
every live tensor storage after each op and keeps the peak. It is the third source of `spbench maxlen` beside
"estimated" (memory/model.py) and "measured" (a GPU), and checks the analytic model at the lengths it claims.

Two peaks are kept: the device total (`peak_bytes`) and the peak of what the trace can state for any optimizer
setup (`state_free_peak_bytes`: the total minus parameters, gradients and optimizer states: activations, SP buffers,
checkpoints, logits, temporaries). DeepSpeed does not run on fake tensors, so a ZeRO setup is traced without it and
its static terms come from the model (memory/traced.py adds them).

How it differs from a GPU run:
* The step reads no value back (`read_back=False`: fake tensors have none).
* Attention runs the runtime's CPU kernel on fake tensors (out + fp32 LSE, no [s × s] matrix, as CUDA flash);
  the op names seen are returned under "attention_ops". Kernel workspaces (flash's fp32 dq accumulator is one)
  and cuBLAS/cuDNN workspaces are not modelled (fake kernels allocate outputs only).
* Checkpoint offload: its CPU copies are the storages `OffloadStats.host_copies` points to; they are counted as
  host memory (`host_peak_bytes`), not device memory. Every other tensor is device memory.
* AdamW is the trainer's foreach implementation, the CUDA default.
* Bytes are exact storage sizes; no caching-allocator rounding or fragmentation, no CUDA context.

MemTracker (torch 2.13) is used through a subclass that (1) keeps only the global peaks in
`_update_peak_stats` (the stock method walks every module's stats after every op: ~5× slower) and records
the phase of the peak, (2) tolerates a module called more than once at top level (the tiled loss calls
`lm_head` once per chunk; stock MemTracker raises, taking it for a second iteration; only per-module
snapshots, which are not used here, are affected), and (3) installs no gradient hooks on a frozen module (the
DPO reference; stock MemTracker raises), and (4) registers no gradient hooks for a module called with gradients off
inside an autograd Function's forward (DeepSpeed ALST's TiledMLP: the inputs require gradients but have no graph
yet; stock ModTracker asserts). None of these changes what is counted.

    python -m spbench.memory.trace --model qwen2.5-7b --length 1048576 --sp 8 --method zigzag [--checkpoint-offload]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from runtime.attention import METHODS
from runtime.config import DTYPES
from runtime.memory import MemoryFeatures

from ..common.schemas import MEMTRACE as SCHEMA
from ..common.units import GiB
from .step import StepSpec, add_feature_args, fake_step, features_from_args


def available() -> str | None:
    """None when FakeTensorMode, MemTracker and the fake process group import; else why not."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
        from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401
        from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    except Exception as e:  # noqa: BLE001 — any import failure means: cannot trace here
        return f"torch {torch.__version__}: {type(e).__name__}: {e}"
    return None


def peak_tracker(host_bytes=lambda: 0, count_flops: bool = False):
    """A MemTracker keeping the peaks of one step (module doc); `host_bytes()`: how much of the CPU total is host
    memory (checkpoint offload's copies); `count_flops`: also add up flop_counter's FLOPs of every op (`.flops`)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
    from torch.utils.flop_counter import flop_registry

    states = (_MemRefType.PARAM, _MemRefType.GRAD, _MemRefType.OPT)

    class PeakTracker(MemTracker):
        """MemTracker keeping the global peaks only, with the phase they happened in (see module doc);
        `host_bytes()` says how much of the CPU total is host memory (checkpoint offload's copies)."""

        def __init__(self, host_bytes, count_flops: bool = False) -> None:
            super().__init__()
            self._mod_tracker = _no_grad_mod_tracker()
            self.host_bytes = host_bytes
            self.flop_registry = flop_registry if count_flops else {}
            self.flops = 0
            self.peak = self.state_free_peak = self.host_peak = 0
            self.attention_peak = self.attention_state_free_peak = 0  # right after an attention backward kernel call
            self.peak_phase: str | None = None
            self.peak_where = self.state_free_where = self.last_op = ""
            self.peak_snap: dict = {}
            self.phase_peaks: dict[str, int] = {}
            self.phase_state_free_peaks: dict[str, int] = {}
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
            _record_peaks(self, self._curr_mem_snap.values(), _TOTAL_KEY, states)

        def _where(self) -> str:
            """The innermost module running (its FQN) and the last op: where the peak is, for reading a trace."""
            parents = [p for p in self._mod_tracker.parents if p != "Global"]
            return f"{max(parents, key=len) if parents else 'top level'}: {self.last_op}"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.__name__:
                self.attention_ops.add(func.__name__)
            self.last_op = func.__name__
            out = super().__torch_dispatch__(func, types, args, kwargs)
            count = self.flop_registry.get(func._overloadpacket)
            if count is not None:  # FlopCounterMode's own formulas; that mode nested here breaks the byte count
                self.flops += count(*args, **(kwargs or {}), out_val=out)
            return out

    return PeakTracker(host_bytes, count_flops)


def _no_grad_mod_tracker():
    """A ModTracker that hooks no gradients of a module called with gradients off (module doc, change 4)."""
    from torch.distributed._tools.mod_tracker import ModTracker

    class NoGradModTracker(ModTracker):
        def _fw_pre_hook(self, mod, input):
            if not torch.is_grad_enabled():
                input = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in input)
            return super()._fw_pre_hook(mod, input)

    return NoGradModTracker()


def _record_peaks(tracker, snaps, total_key, states) -> None:
    """After an op: the device total (less host copies), the state-free total, per-phase peaks, the peaks right
    after an attention backward kernel call (the moment a CUDA kernel holds what the CPU one does not:
    memory/attnterms.py cuda_kernel_bytes; not at Ulysses' all-to-alls around it), and where."""
    phase = "optimizer" if tracker._in_opt else "backward" if tracker._mod_tracker.is_bw else "forward"
    attention = phase == "backward" and "attention" in tracker.last_op and "backward" in tracker.last_op
    host = tracker.host_bytes()
    tracker.host_peak = max(tracker.host_peak, host)
    for snap in snaps:
        device = snap[total_key] - host
        tracker.phase_peaks[phase] = max(tracker.phase_peaks.get(phase, 0), device)
        free = device - sum(snap.get(k, 0) for k in states)
        tracker.phase_state_free_peaks[phase] = max(tracker.phase_state_free_peaks.get(phase, 0), free)
        if attention:
            tracker.attention_peak = max(tracker.attention_peak, device)
            tracker.attention_state_free_peak = max(tracker.attention_state_free_peak, free)
        if free > tracker.state_free_peak:
            tracker.state_free_peak, tracker.state_free_where = free, f"{phase}, {tracker._where()}"
        if device > tracker.peak:
            tracker.peak, tracker.peak_phase, tracker.peak_snap = device, phase, dict(snap)
            tracker.peak_where = tracker._where()


def _host_bytes(trainer):
    """A callable: live bytes of every checkpoint-offload CPU copy the trainer's forwards have made so far."""
    seen: dict[int, object] = {}

    def live() -> int:
        stats = trainer.policy.last_offload
        seen.setdefault(id(stats), stats)
        return sum(s.live_host_bytes() for s in seen.values())

    return live


def traced_peak(spec: StepSpec, rank: int = 0, layers: int | None = None, setup=None) -> dict:
    """Peak memory of one steady-state training step of `spec` on SP rank `rank`, traced on fake tensors.

    Returns {"schema", "model", "stage", "length", "tokens" (this rank's), "sp", "method", "rank", "dtype",
    "features", "peak_bytes", "peak_gib" (device memory), "state_free_peak_gib" (device memory less parameters,
    gradients, optimizer states; "phase_state_free_peak_gib" per phase), "attention_peak_gib" and
    "attention_state_free_peak_gib" (the same right after an attention kernel's backward call), "host_peak_gib" (checkpoint offload's CPU copies), "peak_phase" ("forward" |
    "backward" | "optimizer"), "peak_where" (module and op), "phase_peak_gib", "by_category_gib" (the tensors live at the peak: parameter, buffer,
    gradient, activation, temp, optstate, other; host copies included; MemTracker may file recomputed activations
    under act or temp, the total is exact), "attention_ops", "layers" (the depth traced), "trace_s"}. `layers`:
    trace the preset at that many decoder layers (memory/depth.py; default the model's own). `setup(trainer, pc)`:
    another SP implementation's rank setup (spbench/compare adapters, as common/jobs.train_on_rank takes it),
    applied to the built trainer before the step."""
    why = available()
    if why:
        raise RuntimeError(f"cannot trace memory: {why}")
    if spec.deepspeed:
        raise ValueError("DeepSpeed does not run on fake tensors: trace without it (memory/traced.py adds ZeRO's "
                         "static terms from the model)")
    if not 0 <= rank < spec.sp:
        raise ValueError(f"rank {rank} is not an SP rank of sp={spec.sp}")
    t0 = time.perf_counter()
    with fake_step(spec, rank, layers=layers) as (trainer, micro_batches):
        if setup is not None:  # outside the fake mode: it builds real bookkeeping (ms-swift: a DeviceMesh's rank map)
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                setup(trainer, trainer.pc)
        tracker, metrics = traced_step(trainer, micro_batches)
        depth = trainer.model.config.num_hidden_layers
    return {**peak_record(spec, rank, tracker, metrics["rank_tokens"]), "layers": depth,
            "trace_s": time.perf_counter() - t0}


def traced_step(trainer, micro_batches, count_flops: bool = False) -> tuple:
    """Run ONE step of a fake-step trainer (memory/step.py fake_step) under the peak tracker: (tracker, the step's
    metrics). `count_flops`: the tracker also adds up `torch.utils.flop_counter`'s FLOPs of every op (`.flops`:
    the matmuls; no formula for the CPU attention op)."""
    frozen = [trainer.ref_model] if trainer.ref_model is not None else []
    tracker = peak_tracker(_host_bytes(trainer), count_flops)
    tracker.track_external(trainer.model, trainer.optimizer, *frozen)
    with tracker:
        metrics = trainer.step(0, micro_batches=micro_batches, read_back=False)
    return tracker, metrics


def peak_record(spec: StepSpec, rank: int, tracker, tokens: int) -> dict:
    """traced_peak's dict (without trace_s) from a tracker that ran `spec`'s step on `rank`."""
    by_cat = {str(k.value if hasattr(k, "value") else k).lower(): v / GiB for k, v in tracker.peak_snap.items()
              if k != "Total"}
    return {
        "schema": SCHEMA, "model": spec.model, "stage": spec.stage, "length": spec.length, "tokens": tokens,
        "sp": spec.sp, "method": spec.method, "rank": rank, "dtype": spec.dtype, "features": spec.features.to_json(),
        "peak_bytes": int(tracker.peak), "peak_gib": tracker.peak / GiB, "peak_phase": tracker.peak_phase,
        "peak_where": tracker.peak_where, "attention_peak_gib": tracker.attention_peak / GiB,
        "phase_peak_gib": {k: v / GiB for k, v in tracker.phase_peaks.items()}, "by_category_gib": by_cat,
        **state_free_fields(tracker),
    }


def state_free_fields(tracker) -> dict:
    """The peaks of a tracker's step less parameters, gradients and optimizer states, and the host peak: what
    memory/traced.py composes with ZeRO's static terms (and memory/depth.py extrapolates)."""
    return {
        "state_free_peak_gib": tracker.state_free_peak / GiB, "state_free_where": tracker.state_free_where,
        "phase_state_free_peak_gib": {k: v / GiB for k, v in tracker.phase_state_free_peaks.items()},
        "attention_state_free_peak_gib": tracker.attention_state_free_peak / GiB,
        "host_peak_gib": tracker.host_peak / GiB, "attention_ops": sorted(tracker.attention_ops),
    }


def analytic_for(traced: dict) -> dict:
    """memmodel's prediction for the traced setup (no ZeRO: every rank a full replica, SP as traced, the CPU
    attention kernel the trace runs), and its error
    against the trace with and without the model's GPU-only `workspace` term (error = predicted/traced − 1)."""
    from . import model as mm

    features = MemoryFeatures(**traced["features"])
    setup = mm.Setup(traced["model"], traced["stage"], gpus=traced["sp"], sp=traced["sp"], features=features,
                     sp_method=traced["method"], attention_kernel="cpu-flash")
    pred = mm.peak_memory(setup, traced["length"])
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
    p.add_argument("--checkpoint-offload", action="store_true", help="checkpointed hidden states in CPU memory")
    p.add_argument("--sp", type=int, default=1, help="SP degree (default 1)")
    p.add_argument("--method", choices=METHODS, default="ulysses", help="SP strategy (default ulysses)")
    p.add_argument("--rank", type=int, default=0, help="the SP rank traced (default 0)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    features = features_from_args(args)
    if args.plain:
        features = replace(MemoryFeatures.plain(), gradient_checkpointing=features.gradient_checkpointing)
    spec = StepSpec(args.model, args.stage, args.length, features, dtype=args.dtype, device="cpu", nproc=args.sp,
                    sp=args.sp, method=args.method)
    out = traced_peak(spec, args.rank)
    try:
        out.update(analytic_for(out))
    except Exception as e:  # noqa: BLE001 — a checkpoint dir the model cannot describe: the trace still stands
        out["analytic_error"] = f"{type(e).__name__}: {e}"
    out["torch"] = torch.__version__
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
