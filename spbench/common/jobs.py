"""The rank job that runs the trainer in-process (behind `spbench train`, `spbench parity` and the probes)."""
from __future__ import annotations

import torch

from runtime.config import from_dict
from runtime.train import Trainer, context_for


def train_on_rank(info, cfg_values: dict, capture_grads: bool = False, on_step=None,
                  checkpoints: bool = False, setup=None) -> dict | None:
    """Train with `cfg_values` on this rank; rank 0 returns {"metrics": [...], "grads": {...} | None, "grad_step", "eval": [...]}.

    `on_step(metrics)` runs on rank 0 after each step; `checkpoints`: save and resume as the config says
    (`spbench train`; the harness's runs save nothing). The job's process groups are released at the end, so a
    pool's ranks can run any number of jobs.
    """
    cfg = from_dict(cfg_values)
    pc = context_for(cfg)
    try:
        trainer = Trainer(cfg, pc)
        if setup is not None:  # an adapter of another SP implementation (spbench/compare) swaps its part in here
            setup(trainer, pc)
        history = trainer.train(on_step=on_step if info.rank == 0 else None, capture_grads=capture_grads,
                                checkpoints=checkpoints)
    finally:
        pc.destroy()
    if info.rank != 0:
        return None
    grads = None
    if trainer.captured_grads is not None:
        grads = {k: v.detach().to("cpu", torch.float64) for k, v in trainer.captured_grads.items()}
    return {"metrics": history, "grads": grads, "grad_step": trainer.grad_step, "eval": trainer.eval_history,
            "attention": trainer.model.config._attn_implementation}
