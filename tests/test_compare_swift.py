"""ms-swift's Ulysses attention as a compare adapter: its layout rule (Ulysses = gcd(kv_heads, SP)), the install hint
when ms-swift is absent (always run), and its verdicts where ms-swift is installed (nox -s compare-swift)."""
from __future__ import annotations

import importlib.util

import pytest

from spbench.check.cases import load_suite, select
from spbench.compare import swift
from spbench.compare.run import compare


@pytest.mark.parametrize("kv, sp, layout, strategy", [(2, 2, (2, 1), "ulysses"), (2, 4, (2, 2), "hybrid"),
                                                      (1, 4, (1, 4), "zigzag"), (8, 4, (4, 1), "ulysses"),
                                                      (6, 4, (2, 2), "hybrid"), (3, 2, (1, 2), "zigzag")])
def test_swift_layout_rule(kv, sp, layout, strategy):
    assert swift.swift_layout(kv, sp) == layout and swift.strategy_of(*layout) == strategy


def test_refuses_with_install_hint_without_ms_swift(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swift" else real(name, *a))
    case = select(load_suite("ci")[1], "sft-ulysses-sp2")[0]
    assert swift.MS_SWIFT.refuses(case) == "ms-swift not installed (pip install ms-swift; nox -s compare-swift)"


def test_ms_swift_verdicts(pools):
    """Plain Ulysses rows (SP 2, 2 kv heads) equal SP off, SFT and DPO; SP 4 with 2 kv heads is ms-swift's
    Ulysses 2 x ring 2, declined as not Ulysses; ring is not a mode of ms-swift."""
    pytest.importorskip("swift.sequence_parallel")
    cases = select(load_suite("ci")[1], "sft-ulysses-sp2,dpo-sigmoid-ulysses-sp2,sft-ulysses-sp4,sft-ring-sp2")
    rows = {r["case"]: r for r in compare([swift.MS_SWIFT], cases, log=lambda m: None, pools={2: pools(2)})}
    assert {k: r["verdict"] for k, r in rows.items()} == {"sft-ulysses-sp2": "pass", "dpo-sigmoid-ulysses-sp2": "pass",
                                                          "sft-ulysses-sp4": "refused", "sft-ring-sp2": "refused"}
    assert "Ulysses 2 x ring 2 (hybrid)" in rows["sft-ulysses-sp4"]["cause"]
    assert rows["sft-ulysses-sp2"]["metrics"]["max_loss_rel_err"] < 1e-12


def test_ms_swift_attention_is_traced_in_the_harness_step(monkeypatch):
    """`compare --trace-memory` in ms-swift's venv: its DistributedAttention runs inside the traced step (fake tensors,
    fake process group), every layer's forward and recompute."""
    pytest.importorskip("swift.sequence_parallel")
    from swift.sequence_parallel.ulysses import DistributedAttention

    from runtime.memory import MemoryFeatures
    from spbench.compare.traced import TRACERS
    from spbench.memory.setup import Setup

    calls = []
    real = DistributedAttention.forward
    monkeypatch.setattr(DistributedAttention, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    plain = MemoryFeatures(tiled_loss_chunk=None, tiled_mlp_chunks=None, tiled_norm_chunk=None)
    setup = Setup("tiny", "sft", gpus=2, sp=2, zero=3, offload=frozenset({"optimizer", "param"}), features=plain,
                  sp_method="ulysses")
    trace = TRACERS["ms-swift-ulysses"].trace(setup, 1024)
    assert trace["tokens"] == 512 and trace["state_free_peak_gib"] > 0
    assert len(calls) == 2 * (2 + 3)  # forward and checkpoint recompute, 2- and 3-layer traces
