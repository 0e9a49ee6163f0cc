"""Transformers integration: SP attention registered through AttentionInterface (no monkey-patching).

A model built with ``attn_implementation=ATTN_NAME`` calls `sp_attention_forward` in every
layer. The per-forward facts (which SP strategy and groups, which global tokens this rank
holds, document ids) travel as one keyword argument of the model call, ``sp_batch=SPBatch(...)``,
which transformers passes through to the attention function unchanged. Queries arrive
after RoPE, computed from the *global* position ids the caller passes for its shard.

The mask function is registered under the same name in AttentionMaskInterface and
returns None on purpose: transformers only knows the local shard, so any 4-D mask it
built would be wrong; masks come from SeqMeta (global token order and document ids).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .blockattn import SeqMeta
from .dispatch import SPAttention

ATTN_NAME = "spbench_sp"


@dataclass
class SPBatch:
    """The keyword argument every SP forward carries: strategy + groups, and this batch's layout."""

    attention: SPAttention
    meta: SeqMeta


class SPAttentionCallError(RuntimeError):
    """The SP attention was called in a way it cannot honour."""


def sp_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         sliding_window=None, sp_batch: SPBatch | None = None, **kwargs):
    """AttentionInterface function: q [b,H,s,d], k/v [b,KV,s,d] → (out [b,s,H,d], None)."""
    if sp_batch is None:
        raise SPAttentionCallError(f"{ATTN_NAME} attention needs sp_batch=SPBatch(...) in the model call")
    if dropout:
        raise SPAttentionCallError(f"attention dropout {dropout} is not supported with sequence parallelism; set it to 0")
    if sliding_window is not None:
        raise SPAttentionCallError(f"sliding-window attention ({sliding_window}) is not supported; disable use_sliding_window")
    if attention_mask is not None:
        raise SPAttentionCallError("a transformers attention mask reached SP attention; pass document ids via SeqMeta instead")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, _ = sp_batch.attention(query, key, value, sp_batch.meta, scale)
    return out.transpose(1, 2).contiguous(), None


def sp_attention_mask(*args, **kwargs) -> None:
    """Mask function for ATTN_NAME: None, since SeqMeta carries the real (global) mask."""
    return None


def register_sp_attention() -> str:
    """Register the SP attention and its mask function under ATTN_NAME (idempotent); returns the name."""
    AttentionInterface.register(ATTN_NAME, sp_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sp_attention_mask)
    return ATTN_NAME


def use_sp_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded model to the SP attention (registers it first)."""
    model.set_attn_implementation(register_sp_attention())
    return model
