"""360-LLaMA-Factory's two SP engines as compare adapters: ring-flash-attn (zigzag / contiguous ring) and yunchang
(Ulysses, or its ring over zigzag shards). Both are flash-attn kernels, so they run only on CUDA with flash-attn
installed; anywhere else every case is refused with what is missing on this machine (checked when the case is
asked, not written down). Where they can run, their attention is registered under the runtime's attention name
around the harness's trainer (as compare/alst.py does for ALST), over shards the trainer laid out the way the
engine expects (contiguous for ring and Ulysses, chunks r and 2·SP−1−r for zigzag), each engine's public function
called on [batch, local seq, heads, head dim] tensors. Packed rows would need their varlen functions (cu_seqlens per
shard): not wired, refused.
"""
from __future__ import annotations

import importlib.util

from ..check.cases import Case
from ..common.jobs import train_on_rank
from .adapters import Implementation


def missing_for_flash(package: str) -> list[str]:
    """What this machine lacks to run a flash-attn SP engine: a CUDA device, the flash_attn package, the engine."""
    import torch

    missing = [] if torch.cuda.is_available() else ["no CUDA device"]
    missing += [f"{m} not installed" for m in ("flash_attn", package) if importlib.util.find_spec(m) is None]
    return missing


def _refuser(package: str, methods: tuple[str, ...]):
    def refuses(case: Case) -> str | None:
        missing = missing_for_flash(package)
        if missing:
            return f"needs CUDA + flash-attn ({', '.join(missing)})"
        if case.method not in methods:
            return f"{package} adapter runs {', '.join(methods)}, not {case.method}"
        if case.packing:
            return f"packed rows need {package}'s varlen functions (cu_seqlens per shard): not wired in this adapter"
        return None
    return refuses


def _register(trainer, attend) -> None:
    """The model's attention name now calls `attend(q, k, v, scale) -> out`, tensors [b, s_local, heads, d]."""
    from transformers import AttentionInterface

    from runtime.attention.hf import ATTN_NAME

    sp = trainer.cfg.sequence_parallel_size

    def forward(module, query, key, value, attention_mask, *args, sp_batch=None, **kwargs):
        # HF hands [b, heads, s_local, d]; the flash engines take [b, s_local, heads, d]
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        trainer.comm.add("engine_kv", 2 * k.numel() * k.element_size() * (sp - 1))  # kv around the ring / a2a
        out = attend(q, k, v, getattr(module, "scaling", None))  # [b, s_local, heads, d]
        return out, None

    AttentionInterface.register(ATTN_NAME, forward)


def use_ring_flash_attn(trainer, pc) -> None:
    """Rank setup: zigzag_ring_flash_attn_func / ring_flash_attn_func over the SP group."""
    import ring_flash_attn

    fn = (ring_flash_attn.zigzag_ring_flash_attn_func if trainer.cfg.sequence_parallel_mode == "zigzag"
          else ring_flash_attn.ring_flash_attn_func)
    _register(trainer, lambda q, k, v, scale: fn(q, k, v, softmax_scale=scale, causal=True, group=pc.sp_group))


def use_yunchang(trainer, pc) -> None:
    """Rank setup: yunchang's LongContextAttention, Ulysses degree SP (ulysses) or ring degree SP (zigzag)."""
    import torch.distributed as dist
    from yunchang import LongContextAttention, set_seq_parallel_pg

    sp, zigzag = trainer.cfg.sequence_parallel_size, trainer.cfg.sequence_parallel_mode == "zigzag"
    set_seq_parallel_pg(1 if zigzag else sp, sp if zigzag else 1, dist.get_rank(), dist.get_world_size())
    attn = LongContextAttention(ring_impl_type="zigzag" if zigzag else "basic")
    _register(trainer, lambda q, k, v, scale: attn(q, k, v, softmax_scale=scale, causal=True))


def train_with_ring_flash_attn(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    return train_on_rank(info, cfg_values, capture_grads, setup=use_ring_flash_attn)


def train_with_yunchang(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    return train_on_rank(info, cfg_values, capture_grads, setup=use_yunchang)


RING_FLASH_ATTN = Implementation(
    name="ring-flash-attn", packages=("ring-flash-attn", "flash-attn", "torch"), sp_job=train_with_ring_flash_attn,
    refuses=_refuser("ring_flash_attn", ("ring", "zigzag")),
    features={"strategies": ["ring", "zigzag", "stripe", "llama3 (varlen)"], "gqa": "flash-attn native (kv heads < q heads)",
              "packing": "varlen functions (not wired here)", "dpo": "none (a kernel library)", "zero": "n/a (kernel only)"})

YUNCHANG = Implementation(
    name="yunchang", packages=("yunchang", "flash-attn", "torch"), sp_job=train_with_yunchang,
    refuses=_refuser("yunchang", ("ulysses", "zigzag")),
    features={"strategies": ["ulysses", "ring", "zigzag", "ulysses × ring (USP)"],
              "gqa": "heads divisible by the Ulysses degree", "packing": "not in LongContextAttention",
              "dpo": "none (a kernel library)", "zero": "n/a (kernel only)"})
