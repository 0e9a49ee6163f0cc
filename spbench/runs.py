"""Rank jobs that run the trainer in-process (used by `spbench train`, `spbench parity` and tests)."""
from __future__ import annotations

import torch

from runtime.config import from_dict
from runtime.train import Trainer, context_for


def train_on_rank(info, cfg_values: dict, capture_grads: bool = False, on_step=None, fault: str | None = None) -> dict | None:
    """Train with `cfg_values` on this rank; rank 0 returns {"metrics": [...], "grads": {...} | None}.

    `fault`: a FAULTS.md id whose test-only injection (spbench.faults) is active in this rank.
    """
    from .faults import inject

    with inject(fault, cfg_values):
        return _train(info, cfg_values, capture_grads, on_step)


def _train(info, cfg_values: dict, capture_grads: bool, on_step) -> dict | None:
    cfg = from_dict(cfg_values)
    trainer = Trainer(cfg, context_for(cfg))
    history = trainer.train(on_step=on_step if info.rank == 0 else None, capture_grads=capture_grads)
    if info.rank != 0:
        return None
    grads = None
    if trainer.step0_grads is not None:
        grads = {k: v.detach().to("cpu", torch.float64) for k, v in trainer.step0_grads.items()}
    return {"metrics": history, "grads": grads}
