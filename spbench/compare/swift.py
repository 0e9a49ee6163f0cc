"""ms-swift's Ulysses attention (`swift.sequence_parallel.ulysses.DistributedAttention`) in place of the runtime's SP
attention; contiguous shards, labels and loss reductions stay the harness's.

ms-swift has no strategy switch: `SequenceParallel` splits an SP degree N into Ulysses u = gcd(kv_heads, N) and
ring r = N / u (its zigzag ring attention, flash-attn only). A case is run only where that rule gives the case's
own strategy (ulysses: r = 1; zigzag: u = 1; hybrid: both > 1); ring-attention layouts are declined while flash_attn
is not importable, as its `zigzag_ring_flash_attn_varlen_func` imports it. The Ulysses path is what ms-swift
registers for `sdpa` (`SequenceParallel._prepare_flash_attn`): DistributedAttention's all-to-alls (q, k, v in; out
back; position ids all-gathered) around transformers' own SDPA over the whole sequence. Its state lives on one
fresh `SequenceParallel` per job whose device mesh is the job's SP group: ms-swift's `prepare` patches transformers
once per process and splits inputs in a forward pre-hook, neither of which a pool rank running many jobs can take.
What this adapter does not reach: that pre-hook's padding and splitting (its Ulysses layout is the same contiguous
equal pieces as the runtime's shards), `GatherLoss` and ms-swift's trainer loss.
"""
from __future__ import annotations

import importlib.util
import math

from ..common.jobs import train_on_rank
from .adapters import Implementation, register_wrapped_attention

INSTALL = "pip install ms-swift; nox -s compare-swift"


def swift_layout(kv_heads: int, sp: int) -> tuple[int, int]:
    """(Ulysses, ring) degrees ms-swift's SequenceParallel picks for `sp` ranks: Ulysses = gcd(kv_heads, sp)."""
    ulysses = math.gcd(kv_heads, sp)
    return ulysses, sp // ulysses


def strategy_of(ulysses: int, ring: int) -> str:
    """The harness's name for a (Ulysses, ring) layout: ulysses, zigzag (ms-swift's ring is zigzag) or hybrid."""
    return "ulysses" if ring == 1 else "zigzag" if ulysses == 1 else "hybrid"


def _kv_heads(model: str) -> int:
    from runtime.models import head_counts, model_config

    return head_counts(model_config(model))[1]


def _refuses(case) -> str | None:
    if importlib.util.find_spec("swift") is None:
        return f"ms-swift not installed ({INSTALL})"
    u, r = swift_layout(_kv_heads(case.model), case.sp)
    if strategy_of(u, r) != case.method:
        return (f"ms-swift runs SP {case.sp} with {_kv_heads(case.model)} kv heads as Ulysses {u} x ring {r} "
                f"({strategy_of(u, r)}), not {case.method}: Ulysses = gcd(kv_heads, SP), no strategy switch")
    if r > 1 and importlib.util.find_spec("flash_attn") is None:
        return "ms-swift ring attention (zigzag_ring_flash_attn_varlen_func) needs flash_attn, which is not installed"
    return None


def use_swift_attention(trainer, pc) -> None:
    """Rank setup: the model's attention name now calls ms-swift's DistributedAttention over the SP group."""
    from swift.sequence_parallel import SequenceParallel
    from swift.sequence_parallel.ulysses import DistributedAttention
    from torch.distributed.device_mesh import DeviceMesh
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sp = trainer.cfg.sequence_parallel_size
    state = SequenceParallel()  # this job's own; never the module-level `sequence_parallel`
    state.world_size, (state.sp_world_size, state.rp_world_size) = sp, swift_layout(trainer.shapes.kv_heads, sp)
    state.device_mesh = DeviceMesh.from_group(pc.sp_group, trainer.device.type, mesh_dim_names=("sequence",))

    def local_sdpa(query, key, value, attention_mask, *args, module=None, **kwargs):
        # [b, s, h/N, d] (whole sequence, a slice of the heads) -> SDPA's [b, h/N, s, d] in, [b, s, h/N, d] out
        out, _ = sdpa_attention_forward(module, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        attention_mask, *args, **kwargs)
        return out

    uattn = DistributedAttention(local_sdpa, state)

    def sent(query, key):
        return 2 * (query.numel() + key.numel()) * query.element_size() * (sp - 1) / sp

    def attend(module, query, key, value, *args, **kwargs):
        # q [b, H, s/N, d], k/v [b, KV, s/N, d] -> DistributedAttention's [b, s/N, heads, d]
        out = uattn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, *args, module=module,
                    **kwargs)
        return out, None  # [b, s/N, H, d]

    register_wrapped_attention(trainer, "swift_all_to_all", sent, attend)


def train_with_swift_attention(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    """Rank job: the harness's trainer with ms-swift's Ulysses attention swapped in."""
    return train_on_rank(info, cfg_values, capture_grads, setup=use_swift_attention)


MS_SWIFT = Implementation(
    name="ms-swift-ulysses", packages=("ms-swift", "transformers", "torch"),
    sp_job=train_with_swift_attention, refuses=_refuses,
    features={"strategies": ["ulysses", "zigzag ring (flash-attn)", "ulysses x ring"],
              "layout": "Ulysses = gcd(kv_heads, SP), ring = the rest (no strategy switch)",
              "packing": "padding_free with flash-attn", "dpo": "its own trainer (not reached here)"})
