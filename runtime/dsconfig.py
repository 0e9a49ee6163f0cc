"""A user's DeepSpeed JSON made runnable by the trainer: what the trainer decides is set, "auto" is filled in.

The trainer owns batch sizes, clipping, precision, optimizer and schedule, so those entries are replaced whatever
the file says; "auto" values elsewhere get what HF Trainer gives them (bucket sizes from the hidden size), and a
CPU-offloaded optimizer runs the trainer's torch AdamW (`zero_force_ds_cpu_optimizer: false`) instead of failing
with DeepSpeed's "client optimizer with offload" error. LLaMA-Factory's ds_z*_config.json files run as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError, read_json_object


class DeepSpeedConfigError(InputError):
    """A DeepSpeed JSON the trainer cannot run; the message names the entry."""


def _auto_sizes(hidden: int) -> dict[str, int]:
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def resolve_deepspeed(ds: dict, *, micro_batch: int, grad_accum: int, world: int, max_grad_norm: float,
                      bf16: bool, hidden: int, source: str = "deepspeed config") -> dict:
    """A copy of `ds` with the trainer's settings and no "auto" left (DeepSpeedConfigError if one cannot be filled)."""
    out = json.loads(json.dumps(ds))
    out.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
               train_batch_size=micro_batch * grad_accum * world, gradient_clipping=max_grad_norm)
    out.pop("optimizer", None)  # the trainer's AdamW and schedule are the single source of truth
    out.pop("scheduler", None)
    if (out.get("fp16") or {}).get("enabled") is True:
        raise DeepSpeedConfigError(f"{source}: fp16 is enabled; spbench does not do fp16 loss scaling, use bf16 "
                                   f"(dtype: bfloat16)")
    out.pop("fp16", None)
    out["bf16"] = {**(out.get("bf16") or {}), "enabled": bf16}
    zero = out.setdefault("zero_optimization", {})
    for key, value in _auto_sizes(hidden).items():
        if zero.get(key) == "auto":
            zero[key] = value
    if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
        out["zero_force_ds_cpu_optimizer"] = False  # run the trainer's torch AdamW on the offloaded states
    left = sorted(_auto_paths(out))
    if left:
        raise DeepSpeedConfigError(f"{source}: spbench cannot fill \"auto\" for {', '.join(left)}; give numbers")
    return out


def _auto_paths(d: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in d.items():
        if isinstance(value, dict):
            paths += _auto_paths(value, f"{prefix}{key}.")
        elif value == "auto":
            paths.append(prefix + key)
    return paths


def read_deepspeed_json(path: str) -> dict:
    """The JSON object of a DeepSpeed config file (DeepSpeedConfigError if missing or not a JSON object)."""
    p = Path(path)
    if not p.is_file():
        raise DeepSpeedConfigError(f"deepspeed config {path!r} does not exist")
    return read_json_object(p, DeepSpeedConfigError, f"deepspeed config {path!r}")
