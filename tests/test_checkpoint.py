"""Checkpoints: a killed run resumed is bitwise the uninterrupted one (float64, CPU ranks), resuming across SP
layouts stays on the curve, saved models load in plain transformers with the trainer's logits, ZeRO-3's gathered
save equals the plain one, and a crash mid-save leaves the previous checkpoint whole."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from runtime import checkpoint
from runtime.config import from_dict
from runtime.train import Trainer
from spbench.cli import main

BASE = {"model_name_or_path": "tiny", "cutoff_len": 40, "max_samples": 16, "dtype": "float64", "device": "cpu",
        "learning_rate": 1e-3, "gradient_accumulation_steps": 2}


def yaml_config(path, **values):
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**BASE, **values}.items()))
    return path


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def test_a_killed_run_resumed_is_bitwise_the_uninterrupted_one(tmp_path):
    steps = 24
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cfg = dict(sequence_parallel_size=2, max_steps=steps, save_steps=2)
    assert main(["train", str(yaml_config(tmp_path / "a.yaml", output_dir=str(whole), **cfg))]) == 0
    run = [sys.executable, "-m", "spbench", "train", str(yaml_config(tmp_path / "b.yaml", output_dir=str(broken), **cfg))]
    launcher = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None:  # kill rank 1 once a few checkpoints exist
        if len(checkpoint.complete_checkpoints(broken)) >= 2:
            ranks_of(launcher)[-1].send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert launcher.wait(timeout=120) == 1, "the run finished before a rank could be killed"
    done = checkpoint.complete_checkpoints(broken)[-1][0]
    assert 0 < done < steps and len(metrics(broken)) < steps
    assert main(["train", str(tmp_path / "b.yaml"), "resume_from_checkpoint=true"]) == 0
    a, b = metrics(whole), metrics(broken)
    assert [m["step"] for m in b] == list(range(steps))
    assert [(m["loss"], m["grad_norm"], m["lr"]) for m in a] == [(m["loss"], m["grad_norm"], m["lr"]) for m in b]


def test_resume_with_another_sp_layout_continues_the_curve(tmp_path):
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    assert main(["train", str(yaml_config(tmp_path / "a.yaml", output_dir=str(whole), sequence_parallel_size=2,
                                          max_steps=6, save_steps=3))]) == 0
    assert main(["train", str(yaml_config(tmp_path / "b.yaml", output_dir=str(moved), sequence_parallel_size=2,
                                          max_steps=3, save_steps=3))]) == 0
    # the same global batch (grad accum 2 × dp 1), now Ulysses over 4 ranks, from the SP-2 zigzag checkpoint
    assert main(["train", str(yaml_config(tmp_path / "c.yaml", output_dir=str(moved), sequence_parallel_size=4,
                                          sequence_parallel_mode="ulysses", max_steps=6, save_steps=3,
                                          resume_from_checkpoint=str(moved / "checkpoint-3")))]) == 0
    a, b = metrics(whole), metrics(moved)
    assert [m["step"] for m in b] == list(range(6))
    for x, y in zip(a[3:], b[3:]):
        assert abs(x["loss"] - y["loss"]) <= 1e-10 * abs(x["loss"]) and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-9 * x["grad_norm"]


def test_saved_model_loads_in_plain_transformers_with_the_trainers_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = Trainer(from_dict({**BASE, "max_steps": 2, "output_dir": str(tmp_path), "tiled_mlp_chunks": 3}))
    trainer.train(checkpoints=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="sdpa").eval()
    ids = torch.randint(3, plain.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, trainer.model(ids).logits, rtol=0, atol=1e-12)


def test_zero3_gathered_save_equals_the_plain_save(tmp_path):
    from safetensors.torch import load_file

    from spbench.common.deepspeed import deepspeed_config

    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps(deepspeed_config(3)))
    for name, extra in (("plain", {}), ("zero3", {"deepspeed": str(ds)})):
        # an update of ~1e-9 per weight, so what differs is DeepSpeed's float32 rounding of the weights (≤ ~1e-7
        # relative, measured 6.5e-8), far below what a wrong gather (a partition, zeros, another shard) would show
        cfg = yaml_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), max_steps=2, sequence_parallel_size=2,
                          learning_rate=1e-9, **extra)
        assert main(["train", str(cfg)]) == 0
    plain, zero = (load_file(tmp_path / n / "model.safetensors") for n in ("plain", "zero3"))
    assert set(plain) == set(zero)
    for k, w in plain.items():
        assert zero[k].shape == w.shape and (zero[k] - w).abs().max() <= 1e-6 * max(w.abs().max(), 1e-2), k  # biases start at 0


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    cfg = from_dict({**BASE, "max_steps": 6, "save_steps": 2, "output_dir": str(tmp_path)})
    real = checkpoint._fsync_tree
    calls = []

    def crash_on_second(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(folder)

    monkeypatch.setattr(checkpoint, "_fsync_tree", crash_on_second)
    with pytest.raises(OSError, match="disk gone"):
        Trainer(cfg).train(checkpoints=True)
    assert [n for n, _ in checkpoint.complete_checkpoints(tmp_path)] == [2]
    assert (tmp_path / ".tmp-checkpoint-4").exists() and not (tmp_path / "checkpoint-4").exists()
    monkeypatch.setattr(checkpoint, "_fsync_tree", real)
    resumed = Trainer(cfg.replace(resume_from_checkpoint=True)).train(checkpoints=True)
    assert [m["step"] for m in resumed] == [2, 3, 4, 5]
    whole = Trainer(cfg.replace(output_dir=str(tmp_path / "whole"))).train(checkpoints=True)
    assert [m["loss"] for m in whole[2:]] == [m["loss"] for m in resumed]


def test_save_total_limit_keeps_the_newest(tmp_path):
    Trainer(from_dict({**BASE, "max_steps": 5, "save_steps": 1, "save_total_limit": 2,
                       "output_dir": str(tmp_path)})).train(checkpoints=True)
    assert [n for n, _ in checkpoint.complete_checkpoints(tmp_path)] == [4, 5]


def test_lora_checkpoints_hold_adapters_and_resume_exactly(tmp_path):
    cfg = from_dict({**BASE, "finetuning_type": "lora", "max_steps": 4, "save_steps": 2, "output_dir": str(tmp_path)})
    whole = Trainer(cfg).train(checkpoints=True)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    from peft import PeftModel

    from runtime.models import build_model

    base = build_model("tiny", torch.float64, "sdpa", seed=cfg.seed)  # the preset's weights, as the run started
    plain = PeftModel.from_pretrained(base, tmp_path).eval()  # the final adapters, through plain peft
    assert {k for k in plain.state_dict() if "lora_" in k} >= {f"base_model.model.model.layers.0.mlp.{m}.lora_A.default.weight"
                                                              for m in ("gate_proj", "up_proj", "down_proj")}
    ids = torch.randint(3, 200, (1, 11), generator=torch.Generator().manual_seed(0))
    trained = Trainer(cfg.replace(resume_from_checkpoint=str(tmp_path / "checkpoint-2"), max_steps=2))
    trained.train(checkpoints=True)  # nothing left to run: the state of checkpoint-2
    with torch.no_grad():
        assert torch.allclose(PeftModel.from_pretrained(build_model("tiny", torch.float64, "sdpa", seed=cfg.seed),
                                                        tmp_path / "checkpoint-2").eval()(ids).logits,
                              trained.model.eval()(ids).logits, rtol=0, atol=1e-12)
    assert plain(ids).logits.shape[-1] == base.config.vocab_size
    resumed = Trainer(cfg.replace(resume_from_checkpoint=str(tmp_path / "checkpoint-2"),
                                  output_dir=str(tmp_path / "again"))).train(checkpoints=True)
    assert [m["loss"] for m in whole[2:]] == [m["loss"] for m in resumed]


@pytest.mark.parametrize("extra,msg", [
    ({"resume_from_checkpoint": True}, "holds no complete checkpoint"),
    ({"resume_from_checkpoint": "nowhere/checkpoint-3"}, "is not a complete spbench checkpoint"),
])
def test_unusable_resume_is_one_line_before_any_rank(tmp_path, capsys, extra, msg):
    cfg = yaml_config(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), max_steps=2, **extra)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_a_model_only_checkpoint_is_not_resumable(tmp_path, capsys):
    out = tmp_path / "out"
    Trainer(from_dict({**BASE, "max_steps": 2, "save_steps": 1, "save_only_model": True,
                       "output_dir": str(out)})).train(checkpoints=True)
    cfg = yaml_config(tmp_path / "r.yaml", output_dir=str(out), max_steps=4, resume_from_checkpoint=str(out / "checkpoint-1"))
    assert main(["train", str(cfg)]) == 2
    assert "save_only_model: true" in capsys.readouterr().err


def test_a_deepspeed_run_resumes_exactly_on_its_layout_and_refuses_another(tmp_path, capsys):
    from spbench.common.deepspeed import deepspeed_config

    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps(deepspeed_config(3)))
    common = dict(deepspeed=str(ds), sequence_parallel_size=2, save_steps=2)
    assert main(["train", str(yaml_config(tmp_path / "a.yaml", output_dir=str(tmp_path / "a"), max_steps=4, **common))]) == 0
    assert main(["train", str(yaml_config(tmp_path / "b.yaml", output_dir=str(tmp_path / "b"), max_steps=2, **common))]) == 0
    assert (tmp_path / "b" / "checkpoint-2" / "deepspeed").is_dir()
    assert main(["train", str(tmp_path / "b.yaml"), "max_steps=4", "resume_from_checkpoint=true"]) == 0
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [0, 1, 2, 3]
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    capsys.readouterr()
    assert main(["train", str(tmp_path / "b.yaml"), "max_steps=4", "resume_from_checkpoint=true", "--nproc", "4"]) == 2
    assert "partitioned over 2 ranks; resume it on 2 ranks" in capsys.readouterr().err
