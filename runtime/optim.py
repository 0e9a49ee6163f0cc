"""The trainer's optimizer side: AdamW over the trainable parameters, the lr schedule, clipping, DeepSpeed set-up.

One optimizer for every setup: the trainer's torch AdamW and LambdaLR schedule; under DeepSpeed they are handed
to `deepspeed.initialize` (its own "optimizer" entry is dropped), so ZeRO runs the same update.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig
from .dsconfig import read_deepspeed_json, resolve_deepspeed


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s: linear warmup, then constant/linear/cosine."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        frac = (s - warmup) / max(1, total - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1 - frac)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0
    return f


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip the (already reduced) gradients to `max_norm` (0: no clipping); returns their norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], total_steps: int):
    """(AdamW over `params` — the trainable ones only —, its LambdaLR schedule over `total_steps`)."""
    # foreach: the CUDA default, made explicit so CPU runs and CPU traces use the same update
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def deepspeed_json(cfg: TrainConfig, world: int, dtype: torch.dtype, hidden: int) -> dict:
    """The DeepSpeed config the run uses: the file's, with batch sizes, clipping, bf16 and "auto" values filled in
    (runtime/dsconfig.py); preflight calls it too, so a file it cannot fill fails before any rank starts."""
    return resolve_deepspeed(read_deepspeed_json(cfg.deepspeed), micro_batch=cfg.per_device_train_batch_size,
                             grad_accum=cfg.gradient_accumulation_steps, world=world, max_grad_norm=cfg.max_grad_norm,
                             bf16=dtype == torch.bfloat16, hidden=hidden, source=cfg.deepspeed)


def init_deepspeed(cfg: TrainConfig, module: torch.nn.Module, optimizer, scheduler, world: int, dtype: torch.dtype,
                   hidden: int):
    """(engine, optimizer, scheduler) of `deepspeed.initialize` around `module` with the trainer's AdamW and
    schedule; batch sizes, clipping and bf16 come from `cfg`, whatever the JSON file says."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_json(cfg, world, dtype, hidden))
    return engine, optimizer, scheduler
