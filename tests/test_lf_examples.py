"""Configs written like LLaMA-Factory's and 360-LLaMA-Factory's own examples run unchanged on CPU ranks, but for
model_name_or_path (a preset) and a small max_steps: they load, preflight and train (and evaluate where they ask
to), reading data in LLaMA-Factory's formats through data/dataset_info.json and DeepSpeed files full of "auto".

The configs are written here from the examples' key lists (360-LLaMA-Factory examples/train_full/
llama3_full_sft_ds3.yaml, examples/train_lora/llama3_lora_dpo.yaml and the two runs of 360-example.sh;
LLaMA-Factory examples/train_full/qwen3_full_sft.yaml and examples/train_lora/qwen3_lora_dpo.yaml); the data and
DeepSpeed files are fixtures in those formats, not copies.
"""
from __future__ import annotations

import json
import math

import pytest

from spbench.cli import main

Z3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
      "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
      "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                            "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                            "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                            "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}}
Z3_OFFLOAD = {**Z3, "zero_optimization": {**Z3["zero_optimization"],
                                          "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                          "offload_param": {"device": "cpu", "pin_memory": True}}}


def lf_checkout(root):
    """data/ with dataset_info.json and the demo datasets' formats; examples/deepspeed/ with ZeRO-3 files."""
    data = root / "data"
    data.mkdir()
    identity = [{"instruction": q, "input": "", "output": f"I am {{{{name}}}}, made by {{{{author}}}} ({i})."}
                for i, q in enumerate(["hi", "who are you?", "what is your name?", "hello"] * 3)]
    alpaca = [{"instruction": f"add {i} and {i + 1}", "input": "show the sum", "output": f"{i} + {i + 1} = {2 * i + 1}"}
              for i in range(12)]
    dpo = [{"conversations": [{"from": "human", "value": f"is {i} even?"}],
            "chosen": {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"},
            "rejected": {"from": "gpt", "value": "no" if i % 2 == 0 else "yes"}} for i in range(12)]
    toy_sft = [{"conversations": [{"from": "human", "value": "count"}, {"from": "gpt", "value": "1 2 3"},
                                  {"from": "human", "value": f"go on from {i}"}, {"from": "gpt", "value": f"{i + 1} {i + 2}"}]}
               for i in range(12)]
    toy_dpo = [{"instruction": f"spell {w}", "input": "", "chosen": " ".join(w), "rejected": w[::-1]}
               for w in ["cat", "dog", "bird", "fish", "cow", "hen", "owl", "bee", "ant", "elk", "yak", "emu"]]
    for name, rows in [("identity", identity), ("alpaca_en_demo", alpaca), ("dpo_en_demo", dpo), ("sft_toy", toy_sft),
                       ("dpo_toy", toy_dpo)]:
        (data / f"{name}.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    info = {"identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
            "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
            "sft_toy": {"file_name": "sft_toy.json", "formatting": "sharegpt"},
            "dpo_toy": {"file_name": "dpo_toy.json", "ranking": True,
                        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    ds = root / "examples" / "deepspeed"
    ds.mkdir(parents=True)
    (ds / "ds_z3_config.json").write_text(json.dumps(Z3, indent=2))
    (ds / "ds_z3_offload_config.json").write_text(json.dumps(Z3_OFFLOAD, indent=2))


COMMON_OUT = """logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
"""
COMMON_TRAIN = """lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""
EVAL_360 = """val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

EXAMPLES = {
    "360-llama3_full_sft_ds3": ("""model_name_or_path: tiny
stage: sft
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
output_dir: saves/llama3-8b/full/sft
""" + COMMON_OUT + """per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
""" + COMMON_TRAIN + EVAL_360, 1),
    "360-llama3_lora_dpo": ("""model_name_or_path: tiny
stage: dpo
do_train: true
finetuning_type: lora
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]
dataset: dpo_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
output_dir: saves/llama3-8b/lora/dpo
""" + COMMON_OUT + """per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
""" + COMMON_TRAIN + EVAL_360, 1),
    "360-example-sft-sp8": ("""stage: sft
do_train: true
model_name_or_path: tiny
dataset: sft_toy
template: qwen
finetuning_type: full
output_dir: output/sft-test
cache_dir: .cache
overwrite_cache: true
overwrite_output_dir: true
cutoff_len: 100000
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
lr_scheduler_type: cosine
warmup_ratio: 0.0
logging_steps: 1
save_strategy: steps
save_steps: 2000
learning_rate: 5e-6
num_train_epochs: 4
plot_loss: true
save_only_model: true
deepspeed: examples/deepspeed/ds_z3_offload_config.json
bf16: true
flash_attn: fa2
gradient_checkpointing: true
seed: 42
sequence_parallel_size: 8
packing: true
""", 8),
    "360-example-dpo-sp4": ("""stage: dpo
do_train: true
model_name_or_path: tiny
dataset: dpo_toy
template: qwen
finetuning_type: full
pref_beta: 0.1
pref_loss: sigmoid
output_dir: output/debug
cache_dir: .cache
overwrite_cache: true
overwrite_output_dir: true
cutoff_len: 32768
per_device_train_batch_size: 1
gradient_accumulation_steps: 4
lr_scheduler_type: cosine
warmup_ratio: 0.0
logging_steps: 1
save_steps: 2000
save_strategy: steps
learning_rate: 1e-6
num_train_epochs: 10
plot_loss: true
save_only_model: true
deepspeed: examples/deepspeed/ds_z3_offload_config.json
flash_attn: fa2
gradient_checkpointing: true
bf16: true
ddp_timeout: 180000000
seed: 42
sequence_parallel_size: 4
""", 4),
    "lf-qwen3_full_sft": ("""### model
model_name_or_path: tiny
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json  # choices: [ds_z0_config.json, ds_z2_config.json, ds_z3_config.json]

### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/full/sft
""" + COMMON_OUT + """save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
""" + COMMON_TRAIN + """resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
""", 1),
    "lf-qwen3_lora_dpo": ("""### model
model_name_or_path: tiny
trust_remote_code: true

### method
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]

### dataset
dataset: dpo_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/dpo
""" + COMMON_OUT + """save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
""" + COMMON_TRAIN + """resume_from_checkpoint: null
""", 1),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_llama_factory_example_config_trains_unchanged(tmp_path, monkeypatch, capsys, name):
    text, nproc = EXAMPLES[name]
    lf_checkout(tmp_path)
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (data/, examples/deepspeed/, output_dir) as in LF
    (tmp_path / "run.yaml").write_text(text)
    code = main(["train", "run.yaml", "--nproc", str(nproc), "max_steps=2", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and "note: text renders in the plain format" in err
    out = tmp_path / next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("output_dir:"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    if nproc > 1:  # SP engaged: rank 0 held 1/SP of every step's tokens
        assert all(r["rank_tokens"] * nproc == r["seq_tokens"] for r in steps)
    evals = [r for r in rows if "eval_loss" in r]
    asks_eval = any(line.startswith("val_size:") for line in text.splitlines())  # not the commented-out ones
    assert len(evals) == (1 if asks_eval else 0)  # eval_steps 500: the final evaluation only
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["warmup_ratio"] in (0.0, 0.1)
    assert (out / "provenance.json").exists()
