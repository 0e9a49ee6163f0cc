"""An SP implementation behind one small interface, so the parity suite runs *it* in place of the runtime's SP path.

An adapter says which cases the implementation takes (`refuses(case)` → its reason, before anything runs), and runs
one case's SP side on the suite's ranks (`sp_job(info, cfg_values, capture_grads)` → the same dict as
`spbench.common.jobs.train_on_rank`: per-step metrics, step gradients, attention name). The SP-off reference, the
cases and the tolerances stay the harness's own, so every implementation is judged by the same numbers.
An exception the implementation raises while running is read as its refusal, with its own message.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field

from ..check.cases import Case
from ..common.jobs import train_on_rank


@dataclass(frozen=True)
class Implementation:
    """One SP implementation: its name, the packages it comes from (their versions go into the results), the
    features it documents, the cases it declines up front, and the rank job that trains a case its way."""

    name: str
    packages: tuple[str, ...]
    sp_job: Callable
    refuses: Callable[[Case], str | None] = lambda case: None
    features: dict = field(default_factory=dict)

    def versions(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for pkg in self.packages:
            try:
                out[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                out[pkg] = None
        return out


def register_wrapped_attention(trainer, counter_name: str, sent_bytes: Callable, attend: Callable) -> None:
    """Register an implementation's attention under the runtime's attention name (transformers'
    AttentionInterface, no patching): each call adds `sent_bytes(query, key)` (the bytes its all-to-alls send per
    rank) to the trainer's byte counter as `counter_name`, then returns `attend(module, query, key, value, *args,
    **kwargs)` — transformers' (out, weights); the harness's attention mask is not passed (None: the causal or
    position_ids form the implementation takes)."""
    from transformers import AttentionInterface

    from runtime.attention.hf import ATTN_NAME

    def forward(module, query, key, value, attention_mask, *args, sp_batch=None, **kwargs):
        trainer.comm.add(counter_name, sent_bytes(query, key))
        return attend(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, forward)


SPBENCH = Implementation(
    name="spbench", packages=("spbench", "torch", "transformers"), sp_job=train_on_rank,
    features={"strategies": ["ulysses", "ring", "zigzag", "hybrid", "allgather"], "gqa": "any kv_heads (replicated "
              "up to the Ulysses degree)", "packing": "yes, never across documents", "dpo": ["sigmoid", "ipo", "simpo",
              "hinge"], "zero": [2, 3], "lora": True})
