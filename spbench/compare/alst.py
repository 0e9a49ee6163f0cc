"""DeepSpeed ALST's Ulysses attention (`deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF`) in
place of the runtime's SP attention, everything else (contiguous shards, labels, loss reductions) the harness's.

It is registered the way ALST registers itself with transformers — under the attention name the model already
uses — around transformers' own SDPA, with the attention mask dropped and causality taken from position_ids, as
ALST's `register_with_transformers` wrapper does. Its collectives are not the runtime's, so the bytes it sends are
counted from the tensors it exchanges (q, k, v in; out back; kv heads replicated up to the SP size), which is
what the harness's "SP engaged" check reads. What this adapter does not reach: ALST's data-loader adapter, tiled
MLP and loss, and its DeepSpeed-engine gradient reduction (measured by hand 2026-12-01: SP× too large under ZeRO).
"""
from __future__ import annotations

from ..common.jobs import train_on_rank
from .adapters import Implementation, register_wrapped_attention


def _refuses(case) -> str | None:
    if case.method != "ulysses":
        return f"UlyssesSPAttentionHF implements Ulysses only, not {case.method}"
    return None


def use_alst_attention(trainer, pc) -> None:
    """Rank setup: the model's attention name now calls ALST's UlyssesSPAttentionHF over the SP group."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # its collectives go through deepspeed.comm
    cfg = trainer.cfg
    mc, sp = trainer.model.config, cfg.sequence_parallel_size
    heads, kv = mc.num_attention_heads, mc.num_key_value_heads
    # tensor rows per micro-batch: a packed DPO row holds its pair, an unpacked one is two rows
    rows = cfg.per_device_train_batch_size if cfg.packing else cfg.rows_per_micro_batch
    uattn = UlyssesSPAttentionHF(attn=sdpa_attention_forward, batch_size=rows,
                                 attn_head_count=heads, attn_head_size=mc.hidden_size // heads, kv_head_count=kv,
                                 num_hidden_layers=mc.num_hidden_layers, process_group=pc.sp_group,
                                 seq_length_is_variable=True)
    uattn.core_attn_implementation = "sdpa"

    def sent(query, key):
        return (2 * query.numel() + 2 * key.numel() * max(1, sp // kv)) * query.element_size() * (sp - 1) / sp

    register_wrapped_attention(trainer, "alst_all_to_all", sent,
                               lambda module, q, k, v, *args, **kwargs: uattn(module, q, k, v, None, *args, **kwargs))


def train_with_alst_attention(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    """Rank job: the harness's trainer with ALST's Ulysses attention swapped in."""
    return train_on_rank(info, cfg_values, capture_grads, setup=use_alst_attention)


DEEPSPEED_ALST = Implementation(
    name="deepspeed-alst-attention", packages=("deepspeed", "transformers", "torch"),
    sp_job=train_with_alst_attention, refuses=_refuses,
    features={"strategies": ["ulysses"], "gqa": "kv_heads divisible by SP or SP by kv_heads (replicated)",
              "packing": "flash_attention_2 varlen via position_ids only", "dpo": "no loss of its own", "zero": [1, 2, 3]})
