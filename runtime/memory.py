"""Runtime memory features: tiled MLP, tiled RMSNorm, activation checkpointing, checkpoint offload to CPU.

Each feature is switchable (`MemoryFeatures`) and exact: a step with it gives the same loss
and gradients as without it (tests/test_memory.py checks this in float64). None of them
patches transformers: the tiled MLP (runtime/tiled_mlp.py: one forward and one recompute per chunk)
replaces `layer.mlp` modules *in the user's model instance* by a wrapper, the tiled RMSNorm (runtime/tiled_norm.py: its own
chunked backward) replaces the RMSNorm modules there, checkpointing uses transformers' own switch, and checkpoint
offload is a `saved_tensors_hooks` context the trainer wraps around the decoder forward.

The fourth feature, tiled logits + log-softmax, lives in `runtime.losses.token_logprobs`
(`chunk_tokens=`); `MemoryFeatures.tiled_loss_chunk` is the value to pass there.

Typical use in a trainer (shapes for one rank's shard of `shard_tokens` tokens):

    features = MemoryFeatures()                          # ours: tiled loss + MLP + norm, checkpointing
    prepare_model(model, features, shard_tokens, model.config.hidden_size)
    with forward_context(features):                      # checkpoint offload, if on
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state   # [b, s, h]
    logp = token_logprobs(hidden, model.lm_head, targets, chunk_tokens=features.tiled_loss_chunk)
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .tiled_mlp import TiledMLP, apply_tiled_mlp, remove_tiled_mlp  # noqa: F401 — TiledMLP re-exported
from .tiled_norm import TiledRMSNorm, apply_tiled_norm, remove_tiled_norm  # noqa: F401 — TiledRMSNorm re-exported

DEFAULT_LOSS_CHUNK = 1024
"""Tokens per tiled-loss chunk: 1024 × 152k vocab × 4 B ≈ 0.6 GiB per fp32 logits copy (3 copies live)."""

DEFAULT_NORM_CHUNK = 4096
"""Tokens per tiled-RMSNorm chunk: 4096 × 3584 hidden (7B) × 4 B ≈ 56 MiB per fp32 temporary (3 live in backward)."""

AUTO = "auto"


@dataclass(frozen=True)
class MemoryFeatures:
    """Which memory features a training step uses. The defaults are ours; `plain()` is transformers' usual setup."""

    tiled_loss_chunk: int | None = DEFAULT_LOSS_CHUNK
    """Tokens per chunk of the tiled logits + log-softmax (`runtime.losses.token_logprobs(chunk_tokens=)`);
    None: full-vocabulary logits for the whole shard at once."""

    tiled_mlp_chunks: int | str | None = AUTO
    """Sequence chunks per MLP call: an int ≥ 1, or "auto" = `mlp_chunks_for(shard_tokens, hidden_size)`
    (≈ hidden_size tokens per chunk); None: MLP untiled. It must be the same on every rank (FAULTS.md F11:
    differing counts hang ZeRO-3), so it is derived from the *global* shard length, never from local data."""

    tiled_norm_chunk: int | None = DEFAULT_NORM_CHUNK
    """Tokens per chunk of the tiled RMSNorm (`runtime.tiled_norm.TiledRMSNorm`): its backward holds one chunk's fp32
    temporaries instead of transformers' five [tokens × hidden]; None: transformers' RMSNorm modules."""

    checkpoint_offload: bool = False
    """Keep the checkpointed hidden states (each decoder layer's input) in CPU memory (`checkpoint_offload()`).
    Needs gradient_checkpointing."""

    gradient_checkpointing: bool = True
    """Per-decoder-layer activation checkpointing: one hidden state per layer and token stays saved; each
    layer's activations are recomputed in backward."""

    def __post_init__(self) -> None:
        c = self.tiled_loss_chunk
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"tiled_loss_chunk must be null (None) or an integer >= 1, got {c!r}")
        c = self.tiled_norm_chunk
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"tiled_norm_chunk must be null (None) or an integer >= 1, got {c!r}")
        m = self.tiled_mlp_chunks
        if m is not None and m != AUTO and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"tiled_mlp_chunks must be null (None), auto or an integer >= 1, got {m!r}")
        if self.checkpoint_offload and not self.gradient_checkpointing:
            raise ValueError("checkpoint_offload needs gradient_checkpointing (it offloads the checkpointed "
                             "hidden states); turn gradient checkpointing on or checkpoint offload off")

    @classmethod
    def plain(cls) -> "MemoryFeatures":
        """Plain transformers: no tiling, no offload, gradient checkpointing on (the measured baseline)."""
        return cls(tiled_loss_chunk=None, tiled_mlp_chunks=None, tiled_norm_chunk=None, checkpoint_offload=False,
                   gradient_checkpointing=True)

    def to_json(self) -> dict:
        return {"tiled_loss_chunk": self.tiled_loss_chunk, "tiled_mlp_chunks": self.tiled_mlp_chunks,
                "tiled_norm_chunk": self.tiled_norm_chunk, "checkpoint_offload": self.checkpoint_offload, "gradient_checkpointing": self.gradient_checkpointing}


# ----------------------------------------------------------------------------------------------- tiled MLP
def shard_tokens(seq_len: int, sp: int, rows: int) -> int:
    """Tokens one rank holds of a micro-batch of `rows` sequences of `seq_len` tokens split over `sp` ranks:
    rows × ceil(seq_len / sp). The trainer and the memory model both size the tiled MLP from it (DPO: rows
    counts chosen and rejected). E.g. (70000, 8, 2) → 17500."""
    return rows * math.ceil(seq_len / sp)


def mlp_chunks_for(shard_tokens: int, hidden_size: int) -> int:
    """Chunk count so each MLP chunk has ≤ hidden_size tokens: ceil(shard_tokens / hidden_size), at least 1.

    `shard_tokens` must be the *global* per-rank shard length (padded sequence length × rows / SP size),
    which every rank knows identically, so every rank gets the same count (F11). E.g. (70000, 3584) → 20.
    """
    if shard_tokens < 0 or hidden_size < 1:
        raise ValueError(f"need shard_tokens >= 0 and hidden_size >= 1, got {shard_tokens}, {hidden_size}")
    return max(1, math.ceil(shard_tokens / hidden_size))


def resolve_mlp_chunks(features: MemoryFeatures, shard_tokens: int, hidden_size: int) -> int | None:
    """The concrete chunk count for `features` at this global shard length (None: MLP untiled)."""
    if features.tiled_mlp_chunks is None:
        return None
    if features.tiled_mlp_chunks == AUTO:
        return mlp_chunks_for(shard_tokens, hidden_size)
    return int(features.tiled_mlp_chunks)


# ---------------------------------------------------------------------------------- checkpointing + offload
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Per-decoder-layer activation checkpointing through transformers' own switch (non-reentrant).

    Non-reentrant checkpointing saves each layer's inputs through `saved_tensors_hooks` (torch's
    `_NoopSaveInputs`), which is what lets `checkpoint_offload()` move them to CPU.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo `enable_gradient_checkpointing`."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@dataclass
class OffloadStats:
    """What went through `checkpoint_offload`'s hooks: tensors packed/unpacked, bytes moved to CPU, shapes, and
    weak references to the CPU copies (a memory trace on CPU tells host memory from device memory by them)."""

    packed: int = 0
    unpacked: int = 0
    bytes: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    host_copies: list[weakref.ref] = field(default_factory=list)

    def live_host_bytes(self) -> int:
        """Bytes of the CPU copies still alive (still saved for a backward that has not run)."""
        return sum(t.numel() * t.element_size() for t in (r() for r in self.host_copies) if t is not None)


@contextlib.contextmanager
def checkpoint_offload(pin_memory: bool | None = None) -> Iterator[OffloadStats]:
    """Keep every tensor autograd saves inside this context in CPU memory; bring it back in backward.

    Wrap it around the decoder forward only (`model.model(...)`, not the loss): under per-layer
    checkpointing the tensors saved there are the checkpointed hidden states (one [b, s, h] per layer) and
    a few small ones (token ids, the final norm's inputs). Tensors saved *inside* checkpointed layers or
    loss chunks belong to the checkpoint's own hooks and are recomputed, not offloaded. GPU memory then
    holds one layer's input at a time instead of layers × tokens × hidden × 2 B; CPU memory holds them
    all. Copies go to pinned memory (default: when CUDA is available) with non_blocking transfers, ordered
    on the compute stream. A CPU tensor is copied too (into fresh CPU storage) so the path is the same on
    CPU test machines. Yields an `OffloadStats` that counts what went through.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    stats = OffloadStats()

    def pack(t: torch.Tensor):
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin and not t.is_sparse)
        host.copy_(t, non_blocking=pin)
        stats.packed += 1
        stats.bytes += t.numel() * t.element_size()
        stats.shapes.append(tuple(t.shape))
        stats.host_copies.append(weakref.ref(host))
        return t.device, host

    def unpack(packed) -> torch.Tensor:
        device, host = packed
        stats.unpacked += 1
        # copy=True: a fresh device tensor also when "device" is the CPU, as on a GPU (what a CPU trace counts)
        return host.to(device, non_blocking=pin, copy=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats


def forward_context(features: MemoryFeatures) -> contextlib.AbstractContextManager:
    """`checkpoint_offload()` when the features ask for it, else a no-op context."""
    return checkpoint_offload() if features.checkpoint_offload else contextlib.nullcontext(OffloadStats())


def prepare_model(model: nn.Module, features: MemoryFeatures, shard_tokens: int, hidden_size: int) -> int | None:
    """Apply gradient checkpointing, the tiled MLP and the tiled RMSNorm that `features` ask for to `model` (in place).

    `shard_tokens` is the global per-rank shard length (for the "auto" MLP chunk count). Returns the MLP chunk
    count applied (None: MLP untiled).
    """
    if features.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    else:
        disable_gradient_checkpointing(model)
    chunks = resolve_mlp_chunks(features, shard_tokens, hidden_size)
    if chunks is None:
        remove_tiled_mlp(model)
    else:
        apply_tiled_mlp(model, chunks)
    if features.tiled_norm_chunk is None:
        remove_tiled_norm(model)
    else:
        apply_tiled_norm(model, features.tiled_norm_chunk)
    return chunks
