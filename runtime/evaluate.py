"""Evaluation under SP: forward only, with the shards, objective and global reductions of a training step.

SFT: eval_loss = Σ token losses / Σ supervised tokens of the whole eval set (a rank whose shard holds no label
adds 0, so nothing is NaN); DPO: loss, rewards, accuracies, margins and log-probs averaged over the eval pairs.
HF Trainer (and LLaMA-Factory) average per-batch mean losses instead, so their eval_loss weights batches, not tokens.
"""
from __future__ import annotations

import torch

from .comm import all_reduce_
from .data import shard_batch


def evaluate(trainer, step: int) -> dict:
    """The eval metrics after optimizer step `step` (identical on every rank; every rank must call it)."""
    cfg, sched = trainer.cfg, trainer.eval_schedule
    keys = trainer.metric_keys
    totals = {k: torch.zeros((), dtype=torch.float64, device=trainer.device) for k in keys}
    training = trainer.model.training
    trainer.model.eval()  # adapter dropout off
    with torch.no_grad():
        for mb, weight in sched.micro_batches(trainer.pc.dp_rank, trainer.tokenizer.pad_id):
            lb = shard_batch(mb, trainer.plan, trainer.pc.sp_rank, trainer.device)
            part = {k: torch.zeros_like(v) for k, v in totals.items()}
            trainer.micro_objective(lb, mb.pairs, mb.num_slots, 1, part)  # denominator 1: sums
            for k in keys:
                totals[k] += weight * part[k]
    trainer.model.train(training)
    trainer.comm.records.clear()
    vec = torch.stack([totals[k] for k in keys])
    # sft sums are disjoint over every rank; dpo pair values repeat on each SP rank: sum over DP only
    all_reduce_(vec, trainer.pc.world_group if cfg.stage == "sft" else trainer.pc.dp_group)
    denom = sched.denominator(cfg.stage)
    count = "eval_tokens" if cfg.stage == "sft" else "eval_pairs"
    return {"step": step, count: denom, **{f"eval_{k}": float(v) / max(denom, 1) for k, v in zip(keys, vec)}}


def eval_due(strategy: str, every: int, steps_per_epoch: int, step: int, last: int) -> bool:
    """Whether evaluation follows optimizer step `step` (0-based): every `every` steps, or at each epoch's end
    (and after the last step, as a run's final evaluation)."""
    if strategy == "no":
        return False
    period = every if strategy == "steps" else steps_per_epoch
    return (step + 1) % period == 0 or step == last
