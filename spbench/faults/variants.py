"""The field's SP bugs (../shared/FAULTS.md) as buggy variants of runtime functions, and their injection.

Each injection is a test-only context manager that swaps ONE runtime function (or method) for the buggy
variant the field shipped; the runtime itself carries no fault flags and nothing in it imports this package.
A function is swapped in its defining module *and* in every runtime module that imported it by name, so the
injection reaches the runtime however it refers to the function (tests/test_fault_injection.py holds that
each injection changes the result of a micro-case).
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

import runtime.attention.blockattn
import runtime.attention.ulysses
import runtime.comm
import runtime.config
import runtime.data
import runtime.losses
import runtime.train
from runtime.attention.blockattn import SeqMeta
from runtime.comm import all_reduce_
from runtime.data import MicroBatch
from runtime.layout import ShardPlan, pad_to
from runtime.losses import IGNORE


@contextlib.contextmanager
def swapped(owner, name: str, replacement) -> Iterator[None]:
    """Temporarily replace the attribute `owner.name` (a class's method)."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def swapped_function(module, name: str, replacement) -> Iterator[int]:
    """Temporarily replace function `module.name` wherever a loaded runtime module holds it (its defining module
    and every `from ... import name`); yields how many modules held it."""
    original = getattr(module, name)
    holders = [m for key, m in list(sys.modules.items())
               if (key == "runtime" or key.startswith("runtime.")) and vars(m).get(name) is original]
    for m in holders:
        setattr(m, name, replacement)
    try:
        yield len(holders)
    finally:
        for m in holders:
            setattr(m, name, original)


# ---- the buggy variants -------------------------------------------------------------------------------
def _shard_then_shift(orig):
    """F1: labels shifted after sharding: each shard shifts its own labels, dropping boundary targets."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        plan = plan_for(mb.seq_len)
        labels = torch.cat([torch.full_like(mb.targets[:, :1], IGNORE), mb.targets[:, :-1]], dim=1)  # unshift
        local = plan.shard(pad_to(labels, plan.total_len, 1, IGNORE), sp_rank)
        lb.targets = torch.cat([local[:, 1:], torch.full_like(local[:, :1], IGNORE)], dim=1).to(device)
        return lb
    return shard_batch


def _no_document_mask(orig):
    """F7: packed rows attended as one sequence: attention crosses document boundaries."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        lb.meta = SeqMeta.build(plan_for(mb.seq_len), mb.seq_len, causal=True)
        return lb
    return shard_batch


def _supervised_padding(orig):
    """F8: the padding added for divisibility is supervised (targets padded with the pad id)."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        plan = plan_for(mb.seq_len)
        lb.targets = plan.shard(pad_to(mb.targets, plan.total_len, 1, 0), sp_rank).to(device)
        return lb
    return shard_batch


def _per_rank_mean(n_terms: int):
    """F2: every rank averages its own tokens, then the per-rank means are averaged."""
    def sft_loss(logp, targets, step_tokens):
        return -(logp.sum()) / max(int((targets != IGNORE).sum()), 1) / n_terms
    return sft_loss


def _zero_over_zero(logp, targets, step_tokens):
    """F5: a shard without supervised tokens computes 0/0."""
    count = (targets != IGNORE).sum()
    return (-(logp.sum()) / count) * count / step_tokens


def _micro_denominator(self, step, stage):
    """F4: normalise by one micro-batch's token count scaled by the micro-batch count."""
    first = self.step_units(step)[: self.per_device]
    if stage == "sft":
        return max(1, sum(u.supervised() for u in first)) * self.grad_accum * self.dp
    return len(set().union(*(u.pairs() for u in first))) * self.grad_accum * self.dp


def _average_grads(orig):
    """F3: gradients averaged over the SP group instead of summed (off by P)."""
    def reduce_grads(self):
        orig(self)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(self.pc.grid.world)
    return reduce_grads


def _tiled_kv(x, u):
    """F6: kv heads tiled (repeat) instead of interleaved: query heads meet another head's K/V."""
    kv = x.shape[1]
    return x if kv >= u else x.repeat(1, u // kv, 1, 1)


def _naive_merge_weights(lse, blk_lse):
    """F9: the merge's weights from raw exp(): overflows for large logits (both merge and merge_into use them)."""
    a, b = torch.exp(lse), torch.exp(blk_lse)
    return torch.log(a + b), a / (a + b), b / (a + b)


class _AllReduceBoth(torch.autograd.Function):
    """F10: the sequence-sum reduction all-reduces in backward too (gradients × P)."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group = group
        return all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone(), ctx.group), None, None


def _untiled(hidden, lm_head, targets, chunk_tokens=None):
    """F11: full-vocabulary logits for the whole shard, whatever the chunk size."""
    return ORIGINAL_TOKEN_LOGPROBS(hidden, lm_head, targets, None)


ORIGINAL_TOKEN_LOGPROBS = runtime.losses.token_logprobs


def _sp_silently_off(orig):
    """F12: the SP path is not engaged: rank 0 of each SP group holds the whole sequence (attention plain sdpa),
    the others a 1-token stub with nothing supervised; loss and gradients stay right, no memory is saved."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        if sp_rank == 0:
            return orig(mb, lambda n: ShardPlan.for_length(n, 1, 1, False), 0, device)
        lb = orig(mb, plan_for, sp_rank, device)
        lb.input_ids, lb.position_ids = lb.input_ids[:, :1], lb.position_ids[:, :1]
        lb.targets, lb.seq_slot = torch.full_like(lb.targets[:, :1], IGNORE), torch.full_like(lb.seq_slot[:, :1], -1)
        return lb
    return shard_batch


def _split_twice(orig):
    """F13: an outer adapter shards, then the SP path shards the shard again: 1/N² of the tokens per rank."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        docs = torch.where(lb.seq_slot >= 0, 0, -1)
        inner = MicroBatch(lb.input_ids, lb.targets, lb.position_ids, docs, lb.seq_slot, mb.pairs, mb.num_slots)
        return orig(inner, plan_for, sp_rank, device)
    return shard_batch


class _ScaledGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _tiled_grad_factor(hidden, lm_head, targets, chunk_tokens=None):
    """F14: tiled logits whose forward is exact but whose backward scales each chunk's gradient (0.75×, 1.5×, ...)."""
    if chunk_tokens is None or hidden.reshape(-1, hidden.shape[-1]).shape[0] <= chunk_tokens:
        return ORIGINAL_TOKEN_LOGPROBS(hidden, lm_head, targets, chunk_tokens)
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts = [_ScaledGrad.apply(ORIGINAL_TOKEN_LOGPROBS(h[i:i + chunk_tokens], lm_head, t[i:i + chunk_tokens]),
                               0.75 if (i // chunk_tokens) % 2 == 0 else 1.5)
             for i in range(0, h.shape[0], chunk_tokens)]
    return torch.cat(parts).reshape(targets.shape)


def _norm_over_sp(sp: int):
    """F15: the clipping norm is reduced over the SP group once more after the gradients were summed: √sp × too
    large, so clipping bites too early (and the reported norm is inflated)."""
    def clip_gradients(parameters, max_norm):
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) * sp ** 0.5
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
    return clip_gradients


def _injection(fault: str, cfg: dict) -> contextlib.AbstractContextManager:
    sp = cfg.get("sequence_parallel_size", 1)
    n_terms = sp * cfg.get("gradient_accumulation_steps", 1) * (dist.get_world_size() // sp if dist.is_initialized() else 1)
    shard = runtime.data.shard_batch
    table: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "F1": lambda: swapped_function(runtime.data, "shard_batch", _shard_then_shift(shard)),
        "F2": lambda: swapped_function(runtime.losses, "sft_loss", _per_rank_mean(n_terms)),
        "F3": lambda: swapped(runtime.train.Trainer, "_reduce_grads", _average_grads(runtime.train.Trainer._reduce_grads)),
        "F4": lambda: swapped(runtime.data.StepSchedule, "step_denominator", _micro_denominator),
        "F5": lambda: swapped_function(runtime.losses, "sft_loss", _zero_over_zero),
        "F6": lambda: swapped_function(runtime.attention.ulysses, "replicate_kv", _tiled_kv),
        "F7": lambda: swapped_function(runtime.data, "shard_batch", _no_document_mask(shard)),
        "F8": lambda: swapped_function(runtime.data, "shard_batch", _supervised_padding(shard)),
        "F9": lambda: swapped_function(runtime.attention.blockattn, "_merge_weights", _naive_merge_weights),
        "F10": lambda: swapped_function(runtime.comm, "sum_shards", lambda x, g, c=None: _AllReduceBoth.apply(x, g, c)),
        "F11": lambda: swapped_function(runtime.losses, "token_logprobs", _untiled),
        "F12": lambda: _both(swapped(runtime.config.TrainConfig, "uses_sp_attention", property(lambda self: False)),
                             swapped_function(runtime.data, "shard_batch", _sp_silently_off(shard))),
        "F13": lambda: swapped_function(runtime.data, "shard_batch", _split_twice(shard)),
        "F14": lambda: swapped_function(runtime.losses, "token_logprobs", _tiled_grad_factor),
        "F15": lambda: swapped_function(runtime.train, "clip_gradients", _norm_over_sp(sp)),
    }
    return table[fault]()


INJECTED = tuple(f"F{i}" for i in range(1, 16))
"""The fault ids with an injection."""


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


def inject(fault: str | None, cfg: dict) -> contextlib.AbstractContextManager:
    """Context manager with `fault` injected (a no-op for None); `cfg` is the run's train config values."""
    return contextlib.nullcontext() if fault is None else _injection(fault, cfg)
