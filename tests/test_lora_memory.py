"""The memory model and `spbench maxlen` with LoRA: adapter-sized gradients and AdamW states, no DPO reference model."""
from __future__ import annotations

import argparse
import json

import pytest

from runtime.config import from_dict
from runtime.lora import adapter_parameter_count, meta_model
from runtime.memory import MemoryFeatures
from runtime.models import model_config
from spbench.cli import maxlen
from spbench.memory import model as mm
from spbench.memory.maxlen import Target
from spbench.memory.probe import parser as probe_parser
from spbench.memory.search import SubprocessProbe
from spbench.memory.setup import Setup, shape_of
from spbench.memory.step import spec_from_args

pytestmark = pytest.mark.usefixtures("one_thread")
STATE_TERMS = ("optimizer_states", "grads", "step_temp")


@pytest.mark.parametrize("target", ["all", "q_proj,v_proj", "gate_proj,down_proj,k_proj"])
def test_adapter_params_are_peft_s_count(target):
    """Exact against peft on the tiny preset (the real injection), and against the meta-device architecture of 7B."""
    from runtime.train import Trainer

    t = Trainer(from_dict({"finetuning_type": "lora", "lora_rank": 4, "lora_target": target, "dtype": "float32",
                           "device": "cpu", "cutoff_len": 32, "max_samples": 2}))
    assert shape_of("tiny").adapter_params(4, target) == t.peft.get_nb_trainable_parameters()[0]
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if target == "all" \
        else target.split(",")
    assert shape_of("qwen2.5-7b").adapter_params(16, target) == \
        adapter_parameter_count(meta_model(model_config("qwen2.5-7b")), 16, names)


@pytest.mark.parametrize("zero,offload", [(0, frozenset()), (2, frozenset()), (3, frozenset({"optimizer", "param"}))])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_lora_drops_full_optimizer_states_and_gradients_and_the_reference(zero, offload, stage):
    full = Setup("qwen2.5-7b", stage, 8, 80, 8, zero, offload, MemoryFeatures())
    lora = Setup("qwen2.5-7b", stage, 8, 80, 8, zero, offload, MemoryFeatures(), finetuning="lora", lora_rank=16)
    m = shape_of("qwen2.5-7b")
    adapters = m.adapter_params(16)
    assert adapters == 16 * 28 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))  # r·L·Σ(in+out): q,o k,v mlp
    pf, pl = mm.peak_memory(full, 32768), mm.peak_memory(lora, 32768)
    gib = 2.0**30
    for term in STATE_TERMS:  # each state term of full, scaled by adapters / params (bucket min() aside)
        want = pf["terms"][term] * adapters / m.params
        if term == "grads" and zero:
            want = (0.0 if "optimizer" in offload else 2.0 * adapters / 8) / gib + 2.0 * adapters / gib
        assert pl["terms"][term] == pytest.approx(want, rel=1e-12), term
        assert pl["terms"][term] <= pf["terms"][term] / 10
    # weights: the base plus the adapters (2 B each, ZeRO-3 sharded); DPO's reference model is gone
    assert pl["terms"]["params"] == pytest.approx(pf["terms"]["params"] * (m.params + adapters) / m.params)
    assert pl["terms"]["reference_params"] == 0.0
    assert pf["terms"]["reference_params"] == (pf["terms"]["params"] if stage == "dpo" else 0.0)
    for term in ("checkpoints", "loss", "layer_backward", "sp_buffers", "reference_forward", "final_hidden"):
        assert pl["terms"][term] == pf["terms"][term], term  # activations as before (LoRA's r-wide ones neglected)
    assert pl["total_gib"] <= pf["total_gib"]
    assert mm.maxlen_for(lora) >= mm.maxlen_for(full)


def test_lora_on_one_gpu_trains_far_longer_than_full():
    """7B on one H200 without DeepSpeed: full AdamW states (4 B/param) + grads + temp ≈ 57 GiB go away."""
    one = dict(gpus=1, gpu_mem_gib=139, sp=1, zero=0, features=MemoryFeatures())
    full, lora = Setup("qwen2.5-7b", "sft", **one), Setup("qwen2.5-7b", "sft", **one, finetuning="lora")
    saved = sum(mm.peak_memory(full, 8192)["terms"][t] - mm.peak_memory(lora, 8192)["terms"][t] for t in STATE_TERMS)
    assert saved == pytest.approx(8 * (shape_of("qwen2.5-7b").params - shape_of("qwen2.5-7b").adapter_params(8)) / 2**30)
    assert mm.maxlen_for(lora) > 1.25 * mm.maxlen_for(full)  # 442k vs 335k tokens (activations dominate then)


def test_setup_from_config_carries_lora():
    cfg = from_dict({"finetuning_type": "lora", "lora_rank": 4, "lora_target": "q_proj", "model_name_or_path": "qwen2.5-7b",
                     "sequence_parallel_size": 4, "sequence_parallel_mode": "ulysses", "cutoff_len": 8192})
    s = Setup.from_config(cfg, gpus=4)
    assert (s.finetuning, s.lora_rank, s.lora_target) == ("lora", 4, "q_proj")
    assert s.trained_params(shape_of("qwen2.5-7b")) == 28 * 4 * (3584 + 3584)


def _parse(argv):
    p = argparse.ArgumentParser(prog="spbench maxlen")
    maxlen.add_arguments(p)
    return p.parse_args(argv)


def test_maxlen_cli_gives_lora_rows(tmp_path, capsys):
    rc = maxlen.run(_parse(["--model", "qwen2.5-7b", "--stage", "sft,dpo", "--finetuning-type", "full,lora",
                            "--lora-rank", "16", "--estimate", "--json", "--out", str(tmp_path)]))
    out = capsys.readouterr().out.strip().splitlines()
    rows = {(r["stage"], r["finetuning"]): r for r in json.loads(out[-1])["rows"]}
    assert rc == 0 and len(rows) == 4 and rows["sft", "lora"]["lora_rank"] == 16
    assert any("ours+lora" in line for line in out)
    for stage in ("sft", "dpo"):
        assert rows[stage, "lora"]["max_len"] >= rows[stage, "full"]["max_len"]
    with pytest.raises(maxlen.UsageError, match="--finetuning-type freeze unknown"):
        maxlen.build_targets(_parse(["--model", "tiny", "--finetuning-type", "freeze"]))


def test_probe_argv_round_trips_lora():
    t = Target("ours", Setup("qwen2.5-7b", "dpo", 1, 80.0, 1, 0, frozenset(), MemoryFeatures(), finetuning="lora",
                             lora_rank=32))
    spec = spec_from_args(probe_parser().parse_args(SubprocessProbe(t, 10).argv(4096)[3:]))
    assert (spec.finetuning, spec.lora_rank) == ("lora", 32)
    assert spec.train_config()["finetuning_type"] == "lora" and t.key()["finetuning"] == "lora"
    full = Target("ours", Setup("qwen2.5-7b", "dpo", 1, 80.0, 1, 0, frozenset(), MemoryFeatures()))
    assert "finetuning" not in full.key()  # probes.jsonl of full runs resume as before


def test_the_shipped_maxlen_suite_has_lora_rows_and_lora_rank_overrides():
    targets, _ = maxlen.build_targets(_parse(["--suite", "maxlen-qwen2.5", "--lora-rank", "16"]))
    lora = [t for t in targets if t.setup.finetuning == "lora"]
    assert lora and {t.variant for t in lora} == {"ours+lora"} and {t.setup.lora_rank for t in lora} == {16}
    assert all(t.setup.lora_rank == 16 for t in lora)
    by = {(t.setup.model, t.setup.stage, t.variant): mm.maxlen_for(t.setup) for t in targets if t.setup.model == "qwen2.5-7b"}
    assert by["qwen2.5-7b", "dpo", "ours+lora"] > by["qwen2.5-7b", "dpo", "ours"]  # no reference model
