"""Traced peak memory of one training step, on CPU, without allocating it.

`traced_peak` builds a preset under `FakeTensorMode` (weights, optimizer states and activations are
fake tensors: shapes and dtypes, no storage), primes AdamW's states, and runs ONE full step (forward,
backward, AdamW step) under `torch.distributed._tools.mem_tracker.MemTracker`, which adds up the bytes
of every live tensor storage after each op and keeps the peak. It checks the analytic model
(spbench/memmodel.py) for feature sets that have no GPU measurement yet.

What is traced, and how it differs from a GPU run (spbench.probe):
* The step mirrors `spbench.probe.training_step` op for op, except that it never reads a value back
  (`int(...)`/`float(...)` cannot run on fake tensors): the SFT token count is the length (random targets
  have no IGNORE), and the loss is not returned.
* Attention is transformers' "sdpa" on fake CPU tensors, in the requested dtype (bf16 works): no mask,
  causal, GQA via `enable_gqa` → `aten._scaled_dot_product_flash_attention_for_cpu` (out + fp32 LSE, no
  [s × s] matrix); the op names seen are returned under "attention_ops". The attention kernel's own
  workspace is not modelled (fake kernels allocate outputs only), nor are cuBLAS/cuDNN workspaces:
  compare with the analytic total minus its `workspace` term.
* AdamW is torch's foreach implementation (`foreach=True`), the CUDA default the probe gets; on CPU
  tensors the default would be the per-parameter loop, whose temporaries differ.
* Every tensor is on the fake CPU device, so checkpoint offload (device → host copies) cannot be told
  apart from device memory: it is refused.
* Bytes are exact storage sizes; no caching-allocator rounding or fragmentation, no CUDA context.

MemTracker (torch 2.13) is used through a subclass that (1) keeps only the global peak in
`_update_peak_stats` (the stock method walks every module's stats after every op: ~5× slower) and records
the phase of the peak, (2) tolerates a module called more than once at top level (the tiled loss calls
`lm_head` once per chunk; stock MemTracker raises, taking it for a second iteration; only per-module
snapshots, which are not used here, are affected), and (3) installs no gradient hooks on a frozen module (the
DPO reference; stock MemTracker raises). None of these changes what is counted.

    python -m spbench.memtrace --model qwen2.5-0.5b --length 4096 [--plain] [--stage dpo]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch

from runtime.config import DTYPES
from runtime.losses import preference_loss, sequence_sums, sft_loss, token_logprobs
from runtime.memory import (
    AUTO,
    MemoryFeatures,
    apply_tiled_mlp,
    forward_context,
    prepare_model,
    remove_tiled_mlp,
    resolve_mlp_chunks,
)
from runtime.models import build_model

SCHEMA = "spbench.memtrace/1"
GiB = 2**30


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


@functools.lru_cache(maxsize=2)
def _fake_setup(model_name: str, stage: str, dtype: torch.dtype):
    """(fake mode, policy, reference or None, AdamW with primed states), all fake. Cached: a later trace of
    the same model reuses them (prepare_model re-applies the features; grads are None after a step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from spbench.probe import prime_optimizer

    mode = FakeTensorMode()
    with mode:
        model = build_model(model_name, dtype, "sdpa")
        ref = build_model(model_name, dtype, "sdpa") if stage == "dpo" else None
        model.train()
        if ref is not None:
            ref.eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
        prime_optimizer(model, optimizer)
    return mode, model, ref, optimizer


def _step(model, ref, optimizer, ids, targets, features: MemoryFeatures) -> None:
    """spbench.probe.training_step without reading values back (fake tensors have none)."""
    chunk = features.tiled_loss_chunk
    if ref is not None:
        with torch.no_grad():
            ref_hidden = ref.model(input_ids=ids).last_hidden_state  # [2, s, h]
            ref_sums, _ = sequence_sums(token_logprobs(ref_hidden, ref.lm_head, targets, chunk), targets)
            del ref_hidden
    with forward_context(features):
        hidden = model.model(input_ids=ids).last_hidden_state  # [rows, s, h]
    logp = token_logprobs(hidden, model.lm_head, targets, chunk_tokens=chunk)  # [rows, s]
    if ref is None:
        loss = sft_loss(logp, targets, targets.numel())  # random targets: every token supervised
    else:
        pi, lengths = sequence_sums(logp, targets)
        out = preference_loss("sigmoid", pi[:1], pi[1:], ref_sums[:1], ref_sums[1:], lengths[:1], lengths[1:], beta=0.1)
        loss = out.losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
    rows = 2 if stage == "dpo" else 1
    t0 = time.perf_counter()
    mode, model, ref, optimizer = _fake_setup(model_name, stage, dtype)
    tracker = _tracker_class()()
    with mode:
        prepare_model(model, features, rows * length, model.config.hidden_size)
        if ref is not None:
            chunks = resolve_mlp_chunks(features, rows * length, model.config.hidden_size)
            if chunks is None:
                remove_tiled_mlp(ref)
            else:
                apply_tiled_mlp(ref, chunks)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (rows, length))
        targets = torch.randint(0, vocab, (rows, length))
        tracker.track_external(model, optimizer, ids, targets, *([ref] if ref is not None else []))
        with tracker:
            _step(model, ref, optimizer, ids, targets, features)
    peak = max(tracker._peak_mem.values())
    snap = next(s for d, s in tracker._peak_mem_snap.items() if tracker._peak_mem[d] == peak)
    by_cat = {str(k.value if hasattr(k, "value") else k).lower(): v / GiB for k, v in snap.items() if k != "Total"}
    return {
        "schema": SCHEMA, "model": model_name, "stage": stage, "length": length, "tokens": rows * length,
        "dtype": str(dtype).removeprefix("torch."), "features": features.to_json(),
        "peak_bytes": int(peak), "peak_gib": peak / GiB, "peak_phase": tracker.peak_phase,
        "phase_peak_gib": {k: v / GiB for k, v in tracker.phase_peaks.items()},
        "by_category_gib": by_cat, "attention_ops": sorted(tracker.attention_ops),
        "trace_s": time.perf_counter() - t0,
    }


def analytic_for(traced: dict) -> dict:
    """memmodel's prediction for the traced setup (one GPU, no ZeRO, no offload, no SP), and its error
    against the trace with and without the model's GPU-only `workspace` term (error = predicted/traced − 1)."""
    from spbench import memmodel as mm

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
    p = argparse.ArgumentParser(prog="python -m spbench.memtrace", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="preset name (a local checkpoint dir goes through build_model too; untested)")
    p.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    p.add_argument("--length", type=int, required=True, help="tokens per sequence (DPO: each of chosen, rejected)")
    p.add_argument("--plain", action="store_true", help="plain transformers: no tiling (checkpointing on)")
    p.add_argument("--loss-chunk", default="1024", help="tiled-loss chunk tokens, or 'none' (ignored with --plain)")
    p.add_argument("--mlp-chunks", default=AUTO, help="'auto', a count, or 'none' (ignored with --plain)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plain:
        features = MemoryFeatures.plain()
    else:
        loss = None if args.loss_chunk == "none" else int(args.loss_chunk)
        mlp = None if args.mlp_chunks == "none" else (AUTO if args.mlp_chunks == AUTO else int(args.mlp_chunks))
        features = MemoryFeatures(tiled_loss_chunk=loss, tiled_mlp_chunks=mlp)
    if args.no_gradient_checkpointing:
        features = MemoryFeatures(**{**features.to_json(), "gradient_checkpointing": False})
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
