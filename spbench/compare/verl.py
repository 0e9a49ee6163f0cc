"""verl's Ulysses sequence parallelism in place of the runtime's SP attention; contiguous shards, labels and loss
reductions stay the harness's (verl's `ulysses_pad_and_slice_inputs` cuts the same contiguous equal pieces).

Two adapters:

* `verl-ulysses`: verl's own path. `apply_monkey_patch(model, ulysses_sp_size)` replaces transformers'
  `_flash_attention_forward` with verl's Ulysses wrapper (kv heads repeated up to SP, all-to-alls around flash
  attention, position ids all-gathered); the SP group is the one verl reads (`set_ulysses_sequence_parallel_group`).
  The model's attention name calls transformers' flash-attention entry, so verl's wrapper runs. It needs a flash
  attention implementation: without one (any CPU machine) each case is refused with transformers' own message.
* `verl-ulysses-sdpa`: verl's public all-to-all helpers (`gather_seq_scatter_heads`, `gather_heads_scatter_seq`,
  and `repeat_kv` for kv heads fewer than SP), arranged as verl's wrapper arranges them, around transformers' SDPA
  over the whole sequence: what can run on CPU ranks. Causality is SDPA's, so packed rows attend across documents.

What neither reaches: verl's remove-padding (rmpad) data path and its `gather_outputs_and_unpad` log-prob gather,
its FSDP gradient reduction and its trainers' losses.
"""
from __future__ import annotations

import importlib.util

from ..common.jobs import train_on_rank
from .adapters import Implementation

INSTALL = "pip install verl; nox -s compare-verl"


def _refuses(case) -> str | None:
    if importlib.util.find_spec("verl") is None:
        return f"verl not installed ({INSTALL})"
    if case.method != "ulysses":
        return f"verl implements Ulysses only, not {case.method}"
    return None


def _sent_bytes(query, key, sp: int) -> float:
    """Bytes one rank's Ulysses all-to-alls send for one attention call: q, k, v in (kv heads repeated up to SP),
    out back; each sends (sp - 1)/sp of its tensor."""
    kv_rep = max(1, sp // key.shape[1])
    return (2 * query.numel() + 2 * key.numel() * kv_rep) * query.element_size() * (sp - 1) / sp


def use_verl_ulysses(trainer, pc) -> None:
    """Rank setup: verl's monkey patch on the model, its SP group set, the model's attention name calling
    transformers' flash-attention entry (which now runs verl's Ulysses wrapper)."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    from runtime.attention.hf import ATTN_NAME

    sp = trainer.cfg.sequence_parallel_size
    set_ulysses_sequence_parallel_group(pc.sp_group)
    apply_monkey_patch(trainer.model, ulysses_sp_size=sp)

    def forward(module, query, key, value, attention_mask, *args, sp_batch=None, **kwargs):
        trainer.comm.add("verl_all_to_all", _sent_bytes(query, key, sp))
        # transformers picks the flash kernel by the config's attention name: name flash-attention 2 for it
        config = _View(module.config, _attn_implementation="flash_attention_2")
        return flash_attention_forward(_View(module, config=config), query, key, value, None, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, forward)


def use_verl_all_to_all_sdpa(trainer, pc) -> None:
    """Rank setup: the model's attention name calls verl's Ulysses all-to-alls around transformers' SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from verl.models.transformers.monkey_patch import repeat_kv
    from verl.utils.ulysses import gather_heads_scatter_seq, gather_seq_scatter_heads

    from runtime.attention.hf import ATTN_NAME

    sp, group = trainer.cfg.sequence_parallel_size, pc.sp_group

    def forward(module, query, key, value, attention_mask, *args, sp_batch=None, **kwargs):
        trainer.comm.add("verl_all_to_all", _sent_bytes(query, key, sp))
        # SDPA's [b, heads, s/N, d] -> verl's [b, s/N, heads, d]; kv heads repeated up to SP as verl does
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        rep = max(sp // k.shape[2], 1)
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        # [b, s/N, heads, d] -> [b, s, heads/N, d]
        q, k, v = (gather_seq_scatter_heads(t, seq_dim=1, head_dim=2, group=group) for t in (q, k, v))
        # SDPA over the whole sequence: [b, heads/N, s, d] in, [b, s, heads/N, d] out; its GQA groups now H / (KV·rep)
        groups = q.shape[2] // k.shape[2]
        out, _ = sdpa_attention_forward(_View(module, num_key_value_groups=groups), q.transpose(1, 2), k.transpose(1, 2),
                                        v.transpose(1, 2), None, *args, **kwargs)
        return gather_heads_scatter_seq(out, seq_dim=1, head_dim=2, group=group), None  # [b, s/N, H, d]

    AttentionInterface.register(ATTN_NAME, forward)


class _View:
    """An object as a transformers attention function reads it, with some attributes replaced (the attention
    module's `num_key_value_groups` after a kv repeat; its config's attention name)."""

    def __init__(self, obj, **replaced):
        self._obj = obj
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._obj, name)


def train_with_verl_ulysses(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    """Rank job: the harness's trainer with verl's patched flash-attention Ulysses."""
    return train_on_rank(info, cfg_values, capture_grads, setup=use_verl_ulysses)


def train_with_verl_all_to_all(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    """Rank job: the harness's trainer with verl's all-to-alls around SDPA."""
    return train_on_rank(info, cfg_values, capture_grads, setup=use_verl_all_to_all_sdpa)


FEATURES = {"strategies": ["ulysses"], "gqa": "kv_heads divisible by SP or SP by kv_heads (repeated)",
            "packing": "rmpad + flash-attn varlen via position_ids (not reached here)", "dpo": "no DPO trainer"}
VERL = Implementation(name="verl-ulysses", packages=("verl", "transformers", "torch"), sp_job=train_with_verl_ulysses,
                      refuses=_refuses, features=FEATURES)
VERL_SDPA = Implementation(name="verl-ulysses-sdpa", packages=("verl", "transformers", "torch"),
                           sp_job=train_with_verl_all_to_all, refuses=_refuses, features=FEATURES)
