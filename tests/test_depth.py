"""Depth-extrapolated traces (spbench/memory/depth.py; issue 10 §1): the trainer's step traced at 2 and 3 decoder
layers and extended linearly gives what a ZeRO setup takes from a full-depth trace, byte for byte, at real 7B
shapes (hybrid with checkpoint offload peaking in a layer's attention backward; zigzag DPO peaking in the loss);
a moved peak is refused; device totals are never extrapolated; a setup without ZeRO is traced at full depth."""
from __future__ import annotations

import pytest

from runtime.memory import MemoryFeatures
from runtime.models import ModelError, model_config
from spbench.common.units import GiB
from spbench.memory import depth, traced
from spbench.memory.depth import DEVICE_TOTALS, LINEAR_FIELDS, at_depth, extrapolate, extrapolated_peak
from spbench.memory.setup import Setup
from spbench.memory.step import StepSpec
from spbench.memory.trace import traced_peak

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stage,length,method,offload,where", [
    ("sft", 524288, "hybrid", True, "layers.3.self_attn"),   # the top layer's attention backward, checkpoints on host
    ("dpo", 65536, "zigzag", False, "lm_head"),              # the loss, DPO's reference forward before it
])
def test_extrapolated_trace_equals_the_full_depth_trace(stage, length, method, offload, where):
    """Qwen2.5-7B shapes, SP 8, 4 layers: traced at 2 and 3 and extrapolated = traced at 4, per phase, exactly."""
    spec = StepSpec("qwen2.5-7b", stage, length, MemoryFeatures(checkpoint_offload=offload), dtype="bfloat16",
                    device="cpu", nproc=8, sp=8, method=method)
    full, ext = traced_peak(spec, 0, layers=4), extrapolated_peak(spec, 0, layers=4)
    assert ext["depth"] == {"traced": [2, 3], "extrapolated_to": 4}
    assert where in full["state_free_where"] and ext["state_free_where"] == full["state_free_where"]
    for key in ("state_free_peak_gib", *LINEAR_FIELDS):
        assert round(ext[key] * GiB) == round(full[key] * GiB), key
    assert {p: round(v * GiB) for p, v in ext["phase_state_free_peak_gib"].items()} == \
           {p: round(v * GiB) for p, v in full["phase_state_free_peak_gib"].items()}
    assert full["host_peak_gib"] > 0 if offload else full["host_peak_gib"] == 0
    assert all(ext[k] is None for k in DEVICE_TOTALS)


def _trace(layers: int, free: dict, where: str, host: float = 0.0) -> dict:
    return {"layers": layers, "phase_state_free_peak_gib": free, "state_free_peak_gib": max(free.values()),
            "state_free_where": where, "attention_state_free_peak_gib": free["backward"], "host_peak_gib": host,
            "trace_s": 1.0, "peak_gib": 9.0}


def test_extrapolate_is_a_line_per_phase_and_refuses_a_moved_peak():
    low = _trace(2, {"forward": 1.0, "backward": 2.0, "optimizer": 1.5}, "backward, m.layers.1.self_attn: op", 1.0)
    high = _trace(3, {"forward": 1.5, "backward": 2.5, "optimizer": 2.25}, "backward, m.layers.2.self_attn: op", 1.5)
    out = extrapolate(low, high, 28)
    assert out["phase_state_free_peak_gib"] == {"forward": 14.0, "backward": 15.0, "optimizer": 21.0}
    # the optimizer's line is steeper: at 28 layers it peaks there, not where both traces did
    assert out["state_free_peak_gib"] == 21.0 and out["state_free_where"] == "optimizer (extrapolated)"
    assert out["host_peak_gib"] == 14.0 and out["peak_gib"] is None and out["trace_s"] == 2.0
    moved = _trace(3, high["phase_state_free_peak_gib"], "backward, m.layers.1.self_attn: op")
    with pytest.raises(ValueError, match="moved between 2 and 3 layers"):
        extrapolate(low, moved, 28)
    with pytest.raises(ValueError, match="one layer apart"):
        extrapolate(low, {**high, "layers": 4}, 28)


def test_at_depth_keeps_the_top_layer_on_top():
    assert at_depth("backward, m.layers.2.self_attn: op", 3, 28) == "backward, m.layers.27.self_attn: op"
    assert at_depth("backward, m.layers.0.mlp: op", 3, 28) == "backward, m.layers.0.mlp: op"
    assert at_depth("backward, lm_head: op", 3, 28) == "backward, lm_head: op"


def test_a_setup_without_zero_is_traced_at_full_depth(monkeypatch):
    """Its device total is not a line in depth (gradients grow as checkpoints go): never extrapolated."""
    calls = []

    def fake_trace(spec, rank=0, layers=None):
        calls.append(("full", layers))
        return {"peak_gib": 1.0, "attention_peak_gib": 0.5, "peak_phase": "backward", "host_peak_gib": 0.0,
                "trace_s": 0.0, "layers": 24}

    def no_extrapolation(spec, rank=0, layers=None):
        raise AssertionError("extrapolated a setup without ZeRO")

    monkeypatch.setattr(traced, "traced_peak", fake_trace)
    monkeypatch.setattr(traced, "extrapolated_peak", no_extrapolation)
    setup = Setup("qwen2.5-0.5b", "sft", gpus=1, sp=1, zero=0, offload=frozenset(), attention_kernel="cpu-flash")
    r = traced.traced_setup_peak(setup, 4096, depth="extrapolated")
    assert calls == [("full", None)] and r["depth"] == "24"
    with pytest.raises(ValueError, match="depth 'half'"):
        traced.traced_setup_peak(setup, 4096, depth="half")


def test_depth_override_is_for_presets_only(tmp_path):
    assert model_config("qwen2.5-7b", num_layers=3).num_hidden_layers == 3
    assert model_config("qwen2.5-7b").num_hidden_layers == 28
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="needs a preset"):
        model_config(str(tmp_path), num_layers=2)
    with pytest.raises(ModelError, match="≥ 1 layer"):
        model_config("qwen2.5-7b", num_layers=0)
    assert depth.DEPTHS[0] >= 2


@pytest.mark.parametrize("model,method,kernel,layers", [("llama-3.1-8b", "ulysses", "cpu-flash", 32),
                                                      ("qwen2.5-7b", "allgather", "cpu-flash", 28),
                                                      ("llama-3.1-8b", "ulysses", "cuda-cudnn", 32),
                                                      ("qwen2.5-1.5b", "hybrid", "cuda-cudnn", 28)])
def test_the_model_tracks_the_trace_at_1m_tokens(model, method, kernel, layers):
    """1M tokens, SP 8, ZeRO-3 + offload and checkpoint offload: the memory model within 1 % of the
    depth-extrapolated trace (13.4 / 19.4 / 17.3 / 8.7 GiB device; full depth, reports/cost/strategies: −0.26 / −0.09 %).
    Holds the attention backward's kernel moment (o_proj's input counted alive: Llama +6 %), allgather's
    one-at-a-time casts of the gathered K/V's fp32 gradients (cast together, as before: the trace +0.6 GiB, −3.3 %),
    and where the CUDA kernel's bytes join the trace: right after a kernel call, not at Ulysses' all-to-alls around
    it (joined to any op inside the attention module's backward, as before: −11.3 %). Qwen2.5-1.5B ties its
    embeddings: the lm_head use's gradient waits through every layer's backward (terms.tied_head_grad_bytes; left out
    of the layers phase: −5.1 %), and its hybrid u4 × r2 ring peaks on rank 0 or 7 (both traced)."""
    setup = Setup(model, "sft", 8, 80, 8, 3, frozenset({"optimizer", "param"}),
                  MemoryFeatures(checkpoint_offload=True), method, attention_kernel=kernel)
    r = traced.traced_setup_peak(setup, 1 << 20, depth="extrapolated")
    assert r["depth"] == f"2,3→{layers}" and r["peak_phase"].startswith("backward")
    assert abs(r["error"]) < 0.01, (r["error"], r["traced_gib"], r["model_gib"])
