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
