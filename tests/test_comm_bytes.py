"""Bytes each SP strategy sends in a whole Trainer.step equal the analytic minimum plus the excess the module
names (the ring's final dK/dV hop, the checkpoint recompute) — exactly, on 4 gloo ranks, for every strategy."""
from __future__ import annotations

import pytest
from rankjobs import step_comm_bytes

from runtime.attention import METHODS
from runtime.models import model_config
from spbench.check.comm_bytes import AttentionShape, per_token, step_bytes

TINY = model_config("tiny")
SHAPE = AttentionShape(TINY.num_attention_heads, TINY.num_key_value_heads,
                       TINY.hidden_size // TINY.num_attention_heads, elem_bytes=8, acc_bytes=8)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-recompute", "recompute"])
@pytest.mark.parametrize("method", [*METHODS, "hybrid-2x2"])
def test_a_step_sends_the_minimum_plus_the_explained_excess(pools, method, checkpointing):
    method, degree = ("hybrid", 2) if method == "hybrid-2x2" else (method, "auto")  # tiny's auto hybrid is u = 4
    cfg = {"ulysses_degree": degree, "model_name_or_path": "tiny", "dtype": "float64", "device": "cpu", "cutoff_len": 45, "max_samples": 8,
           "sequence_parallel_size": 4, "sequence_parallel_mode": method, "gradient_accumulation_steps": 2,
           "gradient_checkpointing": checkpointing, "per_device_train_batch_size": 2}
    sent, tokens, u = pools(4).run(step_comm_bytes, cfg)[0]
    want = step_bytes(method, 4, u, SHAPE, tokens, TINY.num_hidden_layers, recompute=checkpointing)
    assert sent == pytest.approx(want["expected"], rel=1e-12), (sent, want)
    print(f"{method:9} recompute={checkpointing!s:5} measured/minimum {sent / want['minimum']:.4f}")


def test_minimum_formulas_worked_example():
    """Qwen2.5-7B attention (28 heads, 4 kv, d 128, bf16) at SP 8: hybrid 4 × 2 sends what a ring of 8 sends
    forward, and 43 % of it backward."""
    s = AttentionShape(28, 4, 128, elem_bytes=2, acc_bytes=4)
    ring = per_token("zigzag", 8, 1, s)
    hybrid = per_token("hybrid", 8, 4, s)
    assert ring["forward"] == 7 * 2 * 4 * 128 * 2 == 14336
    assert hybrid["forward"] == (2 * 28 + 2 * 4) * 128 * 2 * 3 / 4 + 1 * 2 * 4 * 128 * 2  # 12288 + 2048
    assert hybrid["forward"] == ring["forward"] and ring["excess"] == 2 * 4 * 128 * 4
    assert (ring["backward"], hybrid["backward"]) == (7 * 2 * 4 * 128 * 6, 12288 + 2 * 4 * 128 * 6)
