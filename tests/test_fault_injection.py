"""Every injection reaches what the runtime calls: each changes the result of a micro-case (2 CPU ranks), so a
refactor of the runtime's imports can never turn a fault into a silent "missed"."""
from __future__ import annotations

import math

import pytest

from spbench.check.attention import AttnCase
from spbench.common.jobs import train_on_rank
from spbench.faults.catalogue import attention_with_fault, logits_memory_check, train_with_fault
from spbench.faults.variants import INJECTED, inject

BASE = {"model_name_or_path": "tiny", "dtype": "float64", "device": "cpu", "max_steps": 2, "cutoff_len": 64,
        "max_samples": 8, "learning_rate": 1e-3, "gradient_accumulation_steps": 2, "sequence_parallel_size": 2}
MICRO = {  # fault → the micro-case that exercises what it breaks
    "sft-ring": {**BASE, "stage": "sft", "sequence_parallel_mode": "ring"},
    "packed": {**BASE, "stage": "sft", "sequence_parallel_mode": "zigzag", "packing": True},
    "dpo": {**BASE, "stage": "dpo", "sequence_parallel_mode": "zigzag"},
    "tiled": {**BASE, "stage": "sft", "sequence_parallel_mode": "zigzag", "tiled_loss_chunk": 8},
    "clip": {**BASE, "stage": "sft", "sequence_parallel_mode": "ring", "max_grad_norm": 0.01},
}
TRAINING = {"F1": "sft-ring", "F2": "sft-ring", "F3": "sft-ring", "F4": "sft-ring", "F5": "sft-ring",
            "F7": "packed", "F8": "sft-ring", "F10": "dpo", "F12": "sft-ring", "F13": "sft-ring", "F14": "tiled",
            "F15": "clip"}
ATTENTION = {"F6": AttnCase("ulysses", 4, heads=8, kv_heads=2, seq=30, head_dim=8),  # tiling ≠ interleaving: kv ≥ 2
             "F9": AttnCase("zigzag", 2, heads=2, kv_heads=2, seq=32, head_dim=8, q_scale=1000.0)}


def _curve(result: dict) -> list[float]:
    keys = ("loss", "grad_norm", "rank_tokens", "sp_comm_bytes")  # F12 keeps the loss right: SP evidence counts
    return [float(m[k]) for m in result["metrics"] for k in keys]


def _differs(a: list[float], b: list[float]) -> bool:
    return any(x != y and not (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def test_every_injected_fault_is_covered_here():
    assert set(TRAINING) | set(ATTENTION) | {"F11"} == set(INJECTED)


@pytest.mark.parametrize("fault", sorted(TRAINING, key=lambda f: int(f[1:])))
def test_training_injection_changes_the_micro_case(pools, fault):
    cfg = MICRO[TRAINING[fault]]
    clean = pools(2).run(train_on_rank, cfg)[0]
    broken = pools(2).run(train_with_fault, cfg, False, None, fault)[0]
    assert _differs(_curve(broken), _curve(clean)), f"{fault} injected but the run is unchanged: {_curve(clean)}"


@pytest.mark.parametrize("fault", sorted(ATTENTION))
def test_attention_injection_changes_the_micro_case(pools, fault):
    case = ATTENTION[fault]
    clean = pools(case.sp).run(attention_with_fault, None, [case])[0][0]
    broken = pools(case.sp).run(attention_with_fault, fault, [case])[0][0]
    assert any(_differs(broken[q].flatten().tolist(), clean[q].flatten().tolist()) for q in ("out", "dq", "dk", "dv"))


def test_logits_injection_changes_the_memory_check():
    ok_clean, _ = logits_memory_check()
    with inject("F11", {}):
        ok_broken, detail = logits_memory_check()
    assert ok_clean and not ok_broken, detail
