"""Traced max lengths of other implementations (issue 15; spbench/compare/traced.py, alst_trace.py): DeepSpeed
ALST's own step runs on fake tensors with its attention's SP shapes and extrapolates in depth byte for byte; the
search bisects on composed traced peaks; `spbench compare --merge --trace-memory` puts the rows in the report."""
from __future__ import annotations

import importlib.util
import json

import pytest

from spbench.cli import main
from spbench.common.schemas import COMPARE
from spbench.common.units import GiB
from spbench.compare import traced
from spbench.compare.alst_trace import alst_extrapolated, alst_trace
from spbench.memory.depth import LINEAR_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")
deepspeed = pytest.importorskip("deepspeed")


def test_alst_step_traces_on_fake_tensors_and_extrapolates_exactly():
    """Llama-3.1-8B shapes, SP 8, 64k tokens: ALST's attention runs on the 8k-token shard (the CPU flash kernel,
    forward and backward), and 2- and 3-layer traces extended to 4 layers equal a 4-layer trace."""
    full = alst_trace("llama-3.1-8b", 65536, 8, 4)
    assert full["tokens"] == 8192 and full["attention_ops"] == [
        "_scaled_dot_product_flash_attention_for_cpu.default", "_scaled_dot_product_flash_attention_for_cpu_backward.default"]
    ext = alst_extrapolated("llama-3.1-8b", 65536, 8, layers=4)
    for key in ("state_free_peak_gib", *LINEAR_FIELDS):
        assert round(ext[key] * GiB) == round(full[key] * GiB), key
    assert ext["state_free_where"] == full["state_free_where"]
    longer = alst_trace("llama-3.1-8b", 131072, 8, 2)
    assert longer["state_free_peak_gib"] > alst_trace("llama-3.1-8b", 65536, 8, 2)["state_free_peak_gib"]


def test_hf_trainer_path_traces_alst_attention_in_a_plain_step():
    """hf-accelerate-sp (transformers' Trainer under ParallelismConfig) and deepspeed-alst-attention: ALST's
    attention with the model's own loss, untiled. Llama-3.1-8B SP 8 at 256k tokens: the peak is the
    full-vocabulary loss's backward, the memory model within 1 % of it (measured −0.03 %), and the tiled ALST step
    at the same length holds less (traced tiled, as before: the peak would be elsewhere)."""
    from spbench.compare.estimate import memory_features, setup_of
    from spbench.memory.traced import composed_peak

    setup = setup_of({**memory_features()["hf-accelerate-sp"], "checkpoint_offload": False})
    plain = traced.TRACERS["hf-accelerate-sp"].trace(setup, 262144)
    assert traced.TRACERS["deepspeed-alst-attention"].trace == traced.TRACERS["hf-accelerate-sp"].trace
    assert plain["state_free_where"].endswith("_log_softmax_backward_data.default"), plain["state_free_where"]
    assert plain["attention_ops"][0] == "_scaled_dot_product_flash_attention_for_cpu.default"
    assert abs(composed_peak(setup, 262144, plain)["error"]) < 0.01
    tiled = alst_extrapolated("llama-3.1-8b", 262144, 8)
    assert tiled["state_free_peak_gib"] < plain["state_free_peak_gib"] - 5


def test_traced_row_bisects_on_composed_peaks(monkeypatch):
    """A stand-in step whose state-free peak is 40 GiB per million tokens: the search stops where the composed
    peak (plus the model's ZeRO terms) crosses the usable memory, within the resolution; the step is traced without
    the checkpoint offload memory.toml gives ALST (module doc: the trace does not tell a host copy apart)."""
    traced_setups = []

    def step(setup, length):
        traced_setups.append(setup)
        gib = 40 * length / 2**20
        return {"state_free_peak_gib": gib, "attention_state_free_peak_gib": gib, "host_peak_gib": 0.0,
                "state_free_where": "backward, m.layers.31.self_attn: op", "trace_s": 0.5, "layers": 32}

    monkeypatch.setitem(traced.TRACERS, "deepspeed-alst", traced.Tracer(step))
    row = traced.traced_row("deepspeed-alst", log=lambda m: None)
    from spbench.compare.estimate import memory_features, setup_of
    from spbench.memory.traced import composed_peak

    setup = setup_of({**memory_features()["deepspeed-alst"], "checkpoint_offload": False})
    assert composed_peak(setup, row["max_len"], step(setup, row["max_len"]))["fits"]
    assert not composed_peak(setup, row["max_len"] + traced.RESOLUTION, step(setup, row["max_len"] + traced.RESOLUTION))["fits"]
    assert row["probes"] >= 3 and row["trace_s"] == 0.5 * row["probes"] and row["error"] is not None
    assert memory_features()["deepspeed-alst"]["checkpoint_offload"]
    assert traced_setups and not any(s.features.checkpoint_offload for s in traced_setups)


def _minimal_doc() -> dict:
    prov = {"command": "spbench compare --impl deepspeed-alst", "git_sha": "0123456789abcdef", "python": "3.11.7",
            "torch": "2.13.0", "transformers": "5.24.0", "device": "cpu", "date": "2026-12-01", "world": 2}
    return {"schema": COMPARE, "suite": "ci", "provenance": prov,
            "rows": [{"impl": "deepspeed-alst", "case": "a", "verdict": "pass", "cause": None, "metrics": {},
                      "sp_wall_s": 1.0}],
            "implementations": {"deepspeed-alst": {"versions": {"deepspeed": "0.19.8"}, "features": {}}}}


def test_compare_merge_trace_memory_renders_the_traced_rows(tmp_path, monkeypatch):
    row = {"impl": "deepspeed-alst", "model": "llama-3.1-8b", "setup": "ulysses SP 8", "max_len": 1048576,
           "estimated_max_len": 1441792, "traced_gib": 74.7, "model_gib": 55.7, "error": -0.254, "peak_phase": "b",
           "layers_traced": "2,3→32", "probes": 7, "trace_s": 51.7, "resolution": 16384, "source": "traced"}
    monkeypatch.setattr(traced, "traced_rows", lambda impls, carried=None, only=None: {"deepspeed-alst": row})
    src = tmp_path / "run" / "compare.json"
    src.parent.mkdir()
    src.write_text(json.dumps(_minimal_doc()))
    assert main(["compare", "--merge", f"run={src}", "--trace-memory", "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert doc["maxlen_traced"]["deepspeed-alst"]["max_len"] == 1048576
    text = (tmp_path / "out" / "report.md").read_text()
    assert "traced on CPU (no checkpoint offload)" in text and "| deepspeed-alst | llama-3.1-8b | ulysses SP 8 | 1,048,576 |" in text
    assert "-25.4%" in text


def test_merge_carries_rows_traced_in_other_venvs(tmp_path, monkeypatch):
    """ms-swift's step traces only in its venv: its run's traced row survives the merge; what traces here
    (deepspeed-alst) is traced again by the merge's --trace-memory, not carried."""
    carried = {"impl": "ms-swift-ulysses", "model": "llama-3.1-8b", "setup": "ulysses SP 8", "max_len": 344064,
               "estimated_max_len": 344064, "traced_gib": 74.7, "model_gib": 74.7, "error": 0.0, "peak_phase": "b",
               "layers_traced": "2,3→32", "probes": 7, "trace_s": 51.7, "resolution": 16384, "source": "its attention"}
    doc = _minimal_doc()
    doc["implementations"]["ms-swift-ulysses"] = {"versions": {"ms-swift": "4.6.0"}, "features": {}}
    doc["maxlen_traced"] = {"ms-swift-ulysses": carried, "deepspeed-alst": {**carried, "max_len": 7}}
    monkeypatch.setattr(traced, "traceable_here", lambda impl: impl == "deepspeed-alst")
    monkeypatch.setattr(traced, "traced_row", lambda impl, log=print: {**carried, "impl": impl, "max_len": 1})
    src = tmp_path / "run" / "compare.json"
    src.parent.mkdir()
    src.write_text(json.dumps(doc))
    assert main(["compare", "--merge", f"run={src}", "--trace-memory", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["maxlen_traced"]
    assert rows["ms-swift-ulysses"]["max_len"] == 344064 and rows["ms-swift-ulysses"]["run"] == 0
    assert rows["deepspeed-alst"]["max_len"] == 1
    assert traced.traceable_here("ms-swift-ulysses") is False or importlib.util.find_spec("swift") is not None


def test_trace_memory_traces_only_the_implementations_named(tmp_path, monkeypatch, capsys):
    """--trace-memory IMPL (ms-swift's venv traces ms-swift alone, not spbench again); an unknown name is one line,
    exit 2, before anything runs."""
    monkeypatch.setattr(traced, "traceable_here", lambda impl: True)
    monkeypatch.setattr(traced, "traced_row", lambda impl, log=print: {"impl": impl})
    assert traced.traced_rows(["spbench", "deepspeed-alst"], only={"deepspeed-alst"}) == {
        "deepspeed-alst": {"impl": "deepspeed-alst"}}
    assert set(traced.traced_rows(["spbench", "deepspeed-alst"])) == {"spbench", "deepspeed-alst"}
    assert main(["compare", "--merge", "x.json", "--trace-memory", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--trace-memory nope: the traceable implementations are spbench, deepspeed-alst" in err
    assert len(err.splitlines()) == 1


def test_one_search_per_traced_step(monkeypatch):
    """HF's Trainer path and ALST's attention alone trace the same step on the same setup: one search gives both rows
    (each under its own name); implementations whose steps differ are searched each."""
    searched = []
    monkeypatch.setattr(traced, "traceable_here", lambda impl: True)
    monkeypatch.setattr(traced, "traced_row", lambda impl, log=print: searched.append(impl) or {"impl": impl, "max_len": 7})
    rows = traced.traced_rows(["hf-accelerate-sp", "deepspeed-alst-attention", "deepspeed-alst", "spbench"])
    assert sorted(searched) == ["deepspeed-alst", "deepspeed-alst-attention", "spbench"]
    assert rows["hf-accelerate-sp"] == {"impl": "hf-accelerate-sp", "max_len": 7}
    assert {name: row["impl"] for name, row in rows.items()} == {name: name for name in rows}


def test_the_trace_lets_sdpa_run_causal_without_a_mask_as_a_gpu_does():
    """On fake tensors transformers' SDPA mask function cannot read position_ids and builds the [n × n] mask that a GPU
    run skips for an unpacked row; inside the trace's context it returns None, after it the stock function is back."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask

    from runtime.models import model_config
    from spbench.compare.alst_trace import _causal_sdpa_without_mask

    config = model_config("tiny-llama")
    config._attn_implementation = "sdpa"
    stock = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    positions = torch.arange(64).unsqueeze(0)

    def mask():
        with FakeTensorMode(allow_non_fake_inputs=True):
            embeds = torch.zeros(1, 64, config.hidden_size)
            return create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                      past_key_values=None, position_ids=positions)

    assert tuple(mask().shape) == (1, 1, 64, 64)
    with _causal_sdpa_without_mask():
        assert mask() is None
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is stock
