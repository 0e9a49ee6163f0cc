"""Rank jobs used by tests (importable by spawned ranks: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import math

import torch

from runtime.attention import SPAttention, resolve_ulysses, shard_plan
from runtime.attention.blockattn import SeqMeta
from runtime.attention.kernels import select_kernel
from runtime.comm import CommCounter
from runtime.topology import build_parallel_context


def count_attention_bytes(info, method: str, sp: int, heads: int, kv: int, seq: int, dim: int):
    """Bytes this rank sends for one attention forward, then for its backward."""
    u = resolve_ulysses(method, sp, heads, kv)
    pc = build_parallel_context(sp, u)
    plan = shard_plan(method, seq, sp, u)
    meta = SeqMeta.build(plan, seq, causal=True)
    s = plan.local_len
    q = torch.randn(1, heads, s, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv, s, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv, s, dim, dtype=torch.float64, requires_grad=True)
    counter = CommCounter()
    attn = SPAttention(method, pc, select_kernel("reference", q.device, q.dtype), counter)
    out, _ = attn(q, k, v, meta, 1 / math.sqrt(dim))
    fwd = counter.total()
    out.sum().backward()
    return fwd, counter.total() - fwd, s


def hf_logits_and_grads(info, model_name: str, method: str, sp: int, seq: int, dtype: str = "float64"):
    """Tiny model with SP attention: local logits, and parameter grads of Σ logits·W summed over SP."""
    from runtime.attention.hf import SPBatch, register_sp_attention
    from runtime.config import DTYPES
    from runtime.layout import pad_to
    from runtime.models import build_model, model_config

    cfg = model_config(model_name)
    u = resolve_ulysses(method, sp, cfg.num_attention_heads, cfg.num_key_value_heads)
    pc = build_parallel_context(sp, u)
    model = build_model(model_name, DTYPES[dtype], register_sp_attention(), seed=0)
    ids, weights = hf_inputs(cfg.vocab_size, seq)
    plan = shard_plan(method, seq, sp, u)
    meta = SeqMeta.build(plan, seq, causal=True)
    ids_local = plan.shard(pad_to(ids, plan.total_len, 1, 0), pc.sp_rank)
    pos_local = plan.shard(torch.arange(plan.total_len)[None], pc.sp_rank)
    w_local = plan.shard(pad_to(weights, plan.total_len, 1, 0.0), pc.sp_rank).to(DTYPES[dtype])
    attn = SPAttention(method, pc, select_kernel("auto", torch.device("cpu"), DTYPES[dtype]))
    logits = model(input_ids=ids_local, position_ids=pos_local, sp_batch=SPBatch(attn, meta)).logits
    (logits * w_local).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        torch.distributed.all_reduce(g, group=pc.sp_group)  # shards hold partial grads of the same params
        grads[name] = g
    return logits.detach(), grads if pc.sp_rank == 0 else None


def hf_inputs(vocab: int, seq: int):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (2, seq), generator=g), torch.randn(2, seq, vocab, generator=g, dtype=torch.float64)


def misbehave(info, how: str):
    """Rank 1 raises, hangs or dies; other ranks wait in a collective, as a real job would."""
    import os
    import time

    if info.rank == 1:
        if how == "raise":
            raise ValueError("rank 1 broke on purpose")
        if how == "hang":
            time.sleep(3600)
        if how == "die":
            os._exit(3)
    torch.distributed.barrier()
    return info.rank


def oom_on_rank_1(info, cfg_values: dict, cap_gib):
    """A distprobe rank job whose rank 1 runs out of memory (the others wait, as in a collective)."""
    if info.rank == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    import torch.distributed as dist

    dist.barrier()


def gather_and_scatter_warning_free(info):
    """all_gather and reduce_scatter of the runtime with every warning an error: (gathered, scattered)."""
    import warnings

    from runtime.comm import all_gather, reduce_scatter

    group = torch.distributed.group.WORLD
    x = torch.arange(3, dtype=torch.float64) + 10 * info.rank
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return all_gather(x, group), reduce_scatter(torch.stack([x, 2 * x]), group)


def step_comm_bytes(info, cfg_values: dict):
    """(attention bytes rank 0 sent in step 0, tokens it held, the run's Ulysses degree) of one Trainer.step."""
    from runtime.config import from_dict
    from runtime.train import Trainer, context_for

    cfg = from_dict(cfg_values)
    pc = context_for(cfg)
    try:
        trainer = Trainer(cfg, pc)
        m = trainer.step(0)
    finally:
        pc.destroy()
    return m["sp_comm_bytes"], m["rank_tokens"], trainer.ulysses


def train_refusing_packed(info, cfg_values: dict, capture_grads: bool = False):
    """A fake implementation that raises its own error on packed rows (the harness must call it 'refused')."""
    if cfg_values["packing"]:
        raise NotImplementedError("fake-impl: packed sequences are not supported")
    from spbench.common.jobs import train_on_rank

    return train_on_rank(info, cfg_values, capture_grads)
