"""LLaMA-Factory configs: every key of its examples is known (accepted, translated or refused with the reason),
unknown keys are named all at once, and bad values are one line, exit 2, before any rank starts."""
from __future__ import annotations

import json
import math

import pytest

from runtime.config import load_config
from runtime.dsconfig import DeepSpeedConfigError, resolve_deepspeed
from runtime.lf import LFKeyError
from runtime.optim import lr_lambda
from spbench.cli import main


def load(tmp_path, text, overrides=None):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    notes: list[str] = []
    return load_config(cfg, overrides, notes), notes


def test_unknown_keys_are_named_together_without_guessing(tmp_path):
    with pytest.raises(LFKeyError) as e:
        load(tmp_path, "stage: sft\nlearnin_rate: 1\nfoo: 2\nsequence_paralel_size: 2\n")
    msg = str(e.value)
    assert "unknown keys foo, learnin_rate, sequence_paralel_size" in msg and "did you mean" not in msg


# keys the field's near-name guessing turned into other keys: each is accepted as what it is
NEAR_NAMES = ["save_steps: 500", "eval_steps: 500", "plot_loss: true", "warmup_ratio: 0.1",
              "per_device_eval_batch_size: 1", "pref_ftx: 0", "disable_gradient_checkpointing: false",
              "dataset_dir: data", "shuffle_for_sequence_parallel: true", "eval_dataset: null", "logging_steps: 10",
              "report_to: none", "overwrite_output_dir: true", "ddp_timeout: 180000000", "do_train: true",
              "finetuning_type: full", "trust_remote_code: true", "overwrite_cache: true", "cache_dir: .cache",
              "preprocessing_num_workers: 16", "dataloader_num_workers: 4", "run_name: x", "resume_from_checkpoint: null",
              "save_only_model: false", "save_strategy: steps", "template: llama3", "val_size: 0.0", "fp16: false"]


@pytest.mark.parametrize("line", NEAR_NAMES)
def test_keys_that_do_not_change_training_are_accepted(tmp_path, line):
    load(tmp_path, f"stage: sft\n{line}\n")


REFUSED = [("val_size: 0.1", "eval_strategy is no"), ("eval_strategy: steps", "nothing to evaluate"),
           ("pref_ftx: 0.5", "SFT term of the DPO loss"), ("dpo_label_smoothing: 0.1", "label-smoothed"),
           ("rope_scaling: linear", "RoPE scaling"), ("fp16: true", "loss scaling"),
           ("pref_loss: orpo", "orpo is not implemented"), ("pref_loss: kto_pair", "kto_pair is not implemented"),
           ("finetuning_type: freeze", "freeze is not implemented"), ("do_train: false", "spbench only trains"),
           ("optim: sgd", "torch AdamW"),
           ("train_on_prompt: true", "never supervised"), ("lr_scheduler_type: polynomial", "lr_scheduler_type")]


@pytest.mark.parametrize("line,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_keys_that_would_change_training_are_refused_with_the_reason(tmp_path, line, reason):
    with pytest.raises(Exception) as e:
        load(tmp_path, f"stage: dpo\n{line}\n")
    assert reason in str(e.value) and "unknown key" not in str(e.value), str(e.value)


TRANSLATED = [("bf16: true", {"dtype": "bfloat16"}), ("pure_bf16: true", {"dtype": "bfloat16"}),
              ("sequence_parallel_mode: zigzag-ring", {"sequence_parallel_mode": "zigzag"}),
              ("sequence_parallel_mode: llama3", {"sequence_parallel_mode": "allgather"}),
              ("sequence_parallel_mode: ulysses", {"sequence_parallel_mode": "ulysses"}),
              ("neat_packing: true", {"packing": True}), ("flash_attn: fa2", {"attention_kernel": "auto"}),
              ("flash_attn: disabled", {"attention_kernel": "reference"}),
              ("lr_scheduler_type: constant_with_warmup", {"lr_scheduler_type": "constant"}),
              ("disable_gradient_checkpointing: true", {"gradient_checkpointing": False}),
              ("learning_rate: 5e-6", {"learning_rate": 5e-6}), ("warmup_ratio: 0.1", {"warmup_ratio": 0.1}),
              ("ddp_timeout: 180000000", {"ddp_timeout": 180000000}),
              ("dataset: [a.json, b.json]", {"dataset": "a.json,b.json"})]


@pytest.mark.parametrize("line,expected", TRANSLATED, ids=[t[0] for t in TRANSLATED])
def test_translations(tmp_path, line, expected):
    cfg, _ = load(tmp_path, f"stage: sft\n{line}\n")
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_lf_defaults_apply_to_an_lf_config_with_a_note_and_never_to_ours(tmp_path):
    cfg, notes = load(tmp_path, "do_train: true\nstage: sft\nlearning_rate: 1.0e-5\n")
    assert (cfg.num_train_epochs, cfg.lr_scheduler_type, cfg.per_device_train_batch_size, cfg.seed, cfg.cutoff_len,
            cfg.dtype, cfg.learning_rate) == (3.0, "linear", 8, 42, 2048, "float32", 1e-5)
    assert any("its defaults apply" in n and "num_train_epochs 3.0" in n for n in notes)
    assert not any("learning_rate" in n for n in notes)  # the config set it
    bf, _ = load(tmp_path, "do_train: true\nbf16: true\n")
    assert bf.dtype == "bfloat16"
    ours, notes = load(tmp_path, "stage: sft\n")
    assert (ours.num_train_epochs, ours.dtype, ours.seed) == (1.0, "bfloat16", 0) and notes == []


def test_plain_lf_packing_is_noted_as_not_crossing_samples(tmp_path):
    cfg, notes = load(tmp_path, "do_train: true\npacking: true\n")
    assert cfg.packing and any("neat_packing" in n and "cross samples" in n for n in notes)


def test_warmup_ratio_is_ceil_of_ratio_times_steps(tmp_path):
    cfg, _ = load(tmp_path, "warmup_ratio: 0.1\nlr_scheduler_type: constant\n")
    f = lr_lambda(cfg, 25)  # ⌈2.5⌉ = 3 warmup steps
    assert [f(s) for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    both, _ = load(tmp_path, "warmup_ratio: 0.1\nwarmup_steps: 1\n")
    assert lr_lambda(both, 25)(0) == 1.0  # warmup_steps wins
    cos, _ = load(tmp_path, "warmup_ratio: 0.5\nlr_scheduler_type: cosine\n")
    assert lr_lambda(cos, 4)(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_overrides_are_typed_like_the_file(tmp_path):
    from spbench.cli.train import parse_overrides

    over = parse_overrides(["learning_rate=5e-6", "packing=true", "dataset=a.json,b.json", "max_samples="])
    assert over == {"learning_rate": "5e-6", "packing": True, "dataset": "a.json,b.json", "max_samples": None}
    cfg, _ = load(tmp_path, "stage: sft\nmax_steps: 100\n", {**over, "max_steps": 2})
    assert (cfg.learning_rate, cfg.packing, cfg.max_steps) == (5e-6, True, 2)


LF_Z3_OFFLOAD = {  # written like LLaMA-Factory's ds_z3_offload_config.json: "auto" everywhere the HF Trainer fills in
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_gather_16bit_weights_on_model_save": True}}


def test_an_lf_deepspeed_file_is_filled_in():
    ds = resolve_deepspeed(LF_Z3_OFFLOAD, micro_batch=1, grad_accum=2, world=4, max_grad_norm=1.0, bf16=True, hidden=64)
    assert "auto" not in json.dumps(ds)
    z = ds["zero_optimization"]
    assert (ds["train_batch_size"], ds["bf16"]["enabled"], ds["zero_force_ds_cpu_optimizer"], "fp16" in ds) == (8, True, False, False)
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    with pytest.raises(DeepSpeedConfigError, match="fp16 is enabled"):
        resolve_deepspeed({"fp16": {"enabled": True}}, micro_batch=1, grad_accum=1, world=1, max_grad_norm=1, bf16=True, hidden=8)
    with pytest.raises(DeepSpeedConfigError, match='cannot fill "auto" for zero_optimization.sub_group_size'):
        resolve_deepspeed({"zero_optimization": {"sub_group_size": "auto"}}, micro_batch=1, grad_accum=1, world=1,
                          max_grad_norm=1, bf16=True, hidden=8)


def test_an_lf_zero3_offload_file_trains(tmp_path, capsys):
    ds = tmp_path / "ds_z3_offload_config.json"
    ds.write_text(json.dumps(LF_Z3_OFFLOAD))
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\ndo_train: true\ndeepspeed: {ds}\nbf16: true\ncutoff_len: 64\n"
                   f"max_samples: 8\nmax_steps: 1\nper_device_train_batch_size: 1\ndevice: cpu\noutput_dir: {out}\n")
    assert main(["train", str(cfg), "--nproc", "2", "sequence_parallel_size=2"]) == 0, capsys.readouterr().err
    [m] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(m["loss"]) and m["rank_tokens"] * 2 == m["seq_tokens"]


BAD = [("learning_rate: five", "learning_rate"), ("warmup_steps: 0.1", "warmup_ratio"),
       ("warmup_ratio: 1.5", "warmup_ratio"), ("bf16: yes please", "bf16 must be true or false"),
       ("flash_attn: fa9", "flash_attn 'fa9' is not supported"), ("dataset: [a.json, 3]", "dataset"),
       ("val_size: 0.1\nfoo: 1", "unknown keys foo"), ("ddp_timeout: 0", "ddp_timeout")]


@pytest.mark.parametrize("line,names", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line_exit_2_nothing_started(tmp_path, capsys, line, names):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\ndo_train: true\noutput_dir: {out}\n{line}\n")
    assert main(["train", str(cfg), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and "Traceback" not in err[0], err
    assert not out.exists()  # no rank ran, no metrics file left
