"""verl's Ulysses as compare adapters: the install hint when verl is absent (always run), and, where verl is
installed (nox -s compare-verl), its flash-attention patch (refused without a flash attention, as on any CPU) and
its all-to-all helpers around SDPA (plain rows equal SP off, GQA kv 2 < SP 4 included; packed rows wrong)."""
from __future__ import annotations

import importlib.util

import pytest

from spbench.check.cases import load_suite, select
from spbench.compare import verl
from spbench.compare.run import compare


def test_refuses_with_install_hint_without_verl(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "verl" else real(name, *a))
    case = select(load_suite("ci")[1], "sft-ulysses-sp2")[0]
    for impl in (verl.VERL, verl.VERL_SDPA):
        assert impl.refuses(case) == "verl not installed (pip install verl; nox -s compare-verl)"


def test_verl_all_to_all_sdpa_verdicts(pools):
    pytest.importorskip("verl.utils.ulysses")
    cases = select(load_suite("ci")[1], "sft-ulysses-sp4,packed-sft-ulysses-sp4,sft-ring-sp2")
    rows = {r["case"]: r for r in compare([verl.VERL_SDPA], cases, log=lambda m: None,
                                          pools={w: pools(w) for w in (2, 4)})}
    assert {k: r["verdict"] for k, r in rows.items()} == {"sft-ulysses-sp4": "pass", "packed-sft-ulysses-sp4": "wrong",
                                                          "sft-ring-sp2": "refused"}
    assert rows["packed-sft-ulysses-sp4"]["metrics"]["max_loss_rel_err"] > 1e-4


def test_verl_flash_patch_refused_without_flash_attention(pools):
    pytest.importorskip("verl.models.transformers.monkey_patch")
    from transformers.modeling_flash_attention_utils import is_flash_attn_available

    if is_flash_attn_available():
        pytest.skip("a flash attention is installed here: verl's own path runs (nox -s compare-verl)")
    rows = compare([verl.VERL], select(load_suite("ci")[1], "sft-ulysses-sp2"), log=lambda m: None, pools={2: pools(2)})
    assert rows[0]["verdict"] == "refused" and "ImportError" in rows[0]["cause"]


def test_verl_all_to_alls_are_traced_in_the_harness_step(monkeypatch):
    """`compare --trace-memory` in verl's venv: its sequence-to-head all-to-alls run inside the traced step (fake
    tensors, fake process group) for q, k and v of every layer's forward and recompute."""
    ulysses = pytest.importorskip("verl.utils.ulysses")
    pytest.importorskip("verl.models.transformers.monkey_patch")
    from runtime.memory import MemoryFeatures
    from spbench.compare.traced import TRACERS
    from spbench.memory.setup import Setup

    calls = []
    real = ulysses.gather_seq_scatter_heads
    monkeypatch.setattr(ulysses, "gather_seq_scatter_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = MemoryFeatures(tiled_loss_chunk=None, tiled_mlp_chunks=None, tiled_norm_chunk=None)
    setup = Setup("tiny", "sft", gpus=2, sp=2, zero=3, offload=frozenset({"optimizer", "param"}), features=plain,
                  sp_method="ulysses")
    trace = TRACERS["verl-ulysses-sdpa"].trace(setup, 1024)
    assert trace["tokens"] == 512 and trace["state_free_peak_gib"] > 0
    assert len(calls) == 3 * 2 * (2 + 3)  # q, k, v; forward and recompute; 2- and 3-layer traces
