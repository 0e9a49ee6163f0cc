"""DeepSpeed ALST's training step traced on fake tensors (issue 15: an implementation's peak memory at a long length).

What runs, as SP rank 0 of a fake process group inside `FakeTensorMode` (spbench/memory/trace.py's tracker):
transformers' model (the preset, random init, gradient checkpointing as ALST's tutorial sets it), ALST's
`UlyssesSPAttentionHF.register_with_transformers` over SDPA, ALST's `TiledMLP` on every decoder MLP
(ceil(shard / hidden) shards, compare/alst_engine.py's rule) and ALST's `TiledFusedLogitsLoss` (1024-token
pieces), one forward and backward of a full-length row's shard. Its one change: the loss's backward multiplies
its saved gradient by the incoming one in place always, where ALST's skips that when the incoming gradient is
1.0 — a value a fake tensor does not have; no byte differs.

What does not run: DeepSpeed's engine (it does not run on fake tensors) — as for the runtime's own traces, ZeRO's
static terms (parameters, gradients, optimizer states, workspace) come from the memory model
(spbench/memory/traced.py composed_peak) for the implementation's compare/memory.toml setup; ALST's checkpoint
offload (CheckpointHiddenStatesOffload) is not wired (on fake CPU tensors a host copy is not told apart), so the
traced setup is the entry's without it. The step is traced at 2 and 3 decoder layers and extrapolated
(spbench/memory/depth.py).

`tiled=False` is ALST's attention in an otherwise plain transformers step — the step Hugging Face's Trainer runs
under accelerate's ParallelismConfig(sp_backend="deepspeed") (transformers' deepspeed_sp_compute_loss: the model's
own causal-LM loss over the pre-shifted `shift_labels`, full-vocabulary logits upcast to float32, no TiledMLP), and
the compare entry deepspeed-alst-attention's.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from runtime.memory import DEFAULT_LOSS_CHUNK, mlp_chunks_for
from runtime.models import build_model


def _traceable_loss():
    """ALST's TiledFusedLogitsLoss with a backward that reads no tensor value (module doc)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    class TracedTiledLoss(TiledFusedLogitsLoss):
        @staticmethod
        def backward(ctx, *grads):
            (x_grad,) = ctx.saved_tensors
            x_grad.mul_(grads[0])  # in place, as ALST's does when the incoming gradient is not 1.0
            return (None, None, x_grad, None, None, None, None, None, None)

    return TracedTiledLoss


@contextlib.contextmanager
def _causal_sdpa_without_mask():
    """transformers' "sdpa" mask function returns None inside (module doc), its own one again after."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    saved = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    AttentionMaskInterface.register("sdpa", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        AttentionMaskInterface.register("sdpa", saved)


def _step(model, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, tiled: bool) -> None:
    """One forward and backward of a shard (`ids`, `positions`, `labels`: [1, n] real tensors, so that transformers'
    mask code reads position_ids as a GPU run does): hidden states, ALST's tiled logits loss (`tiled`; else the
    model's own loss, as HF's Trainer calls it under SP), backward."""
    if not tiled:
        model(input_ids=ids, position_ids=positions, labels=labels, shift_labels=labels).loss.backward()
        return
    n = ids.shape[1]
    hidden = model.base_model(input_ids=ids, position_ids=positions).last_hidden_state
    head = model.get_output_embeddings()

    def loss_fn(head, x, y):
        return torch.nn.functional.cross_entropy(head(x), y, reduction="sum")

    pieces = math.ceil(n / DEFAULT_LOSS_CHUNK)
    _traceable_loss().apply(loss_fn, head, hidden, labels, None, pieces, [head.weight], "sum").backward()


def alst_trace(model_name: str, length: int, sp: int, layers: int, tiled: bool = True) -> dict:
    """memory/trace.py's state-free fields for ALST's step (module doc; `tiled=False`: its attention in a plain
    transformers step) at `length` tokens, SP `sp`, `layers` decoder layers, on SP rank 0: {"layers", "tokens",
    "state_free_peak_gib", "state_free_where", "phase_state_free_peak_gib", "attention_state_free_peak_gib",
    "host_peak_gib" (0), "attention_ops", "trace_s"}."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..memory.step import fake_rank
    from ..memory.trace import peak_tracker, state_free_fields
    from .alst_engine import _release_alst, use_alst_tiled_mlp

    t0, n = time.perf_counter(), length // sp
    ids, labels = torch.zeros((1, n), dtype=torch.long), torch.zeros((1, n), dtype=torch.long)
    positions = torch.arange(n).unsqueeze(0)  # rank 0's shard; built before the fake mode: real values
    with fake_rank(0, sp):
        deepspeed.init_distributed(dist_backend="fake")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = build_model(model_name, torch.bfloat16, "sdpa", num_layers=layers)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            if tiled:
                use_alst_tiled_mlp(model, mlp_chunks_for(n, model.config.hidden_size))
            mpu = UlyssesSPAttentionHF.register_with_transformers(
                model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=sp,
                micro_batch_size=1, seq_length=length, seq_length_is_variable=False)
            try:
                tracker = peak_tracker()
                tracker.track_external(model)
                with tracker, _causal_sdpa_without_mask():
                    _step(model, ids, positions, labels, tiled)
            finally:
                _release_alst(mpu, None, sdpa_attention_forward)
    return {"layers": layers, "tokens": n, **state_free_fields(tracker), "trace_s": time.perf_counter() - t0}


def alst_extrapolated(model_name: str, length: int, sp: int, layers: int | None = None, tiled: bool = True) -> dict:
    """`alst_trace` at `layers` decoder layers (default the model's): traced at 2 and 3 layers, extrapolated
    (spbench/memory/depth.py)."""
    from runtime.models import model_config

    from ..memory.depth import extrapolated

    return extrapolated(lambda d: alst_trace(model_name, length, sp, d, tiled),
                        layers or model_config(model_name).num_hidden_layers)
