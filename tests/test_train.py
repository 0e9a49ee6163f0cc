"""Trainer, data pipeline and config: oracles at SP=1, data rules, and one-line errors for bad input."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from runtime.config import ConfigError, from_dict
from runtime.data import DataError, StepSchedule, build_units, collate
from runtime.formats import read_examples
from runtime.losses import IGNORE, token_logprobs
from runtime.records import ByteTokenizer
from runtime.train import Trainer

BASE = dict(dtype="float64", cutoff_len=40, max_samples=8, max_steps=1, device="cpu", learning_rate=1e-3)


def test_sft_loss_equals_transformers_labels_loss():
    t = Trainer(from_dict({**BASE, "dtype": "float32", "per_device_train_batch_size": 2}))
    mb = t.schedule.micro_batches(0, 0, ByteTokenizer.pad_id)[0]
    labels = torch.where(mb.doc_ids >= 0, mb.input_ids, torch.full_like(mb.input_ids, IGNORE))
    # transformers shifts `labels` itself; rebuild unshifted labels from our shifted targets
    unshifted = torch.full_like(mb.targets, IGNORE)
    unshifted[:, 1:] = mb.targets[:, :-1]
    with torch.no_grad():
        hf = t.model(input_ids=mb.input_ids, labels=unshifted).loss
    metrics = t.step(0)
    assert labels.shape == mb.input_ids.shape
    assert metrics["loss"] == pytest.approx(float(hf), rel=1e-5)


def test_dpo_loss_equals_textbook_formula():
    cfg = from_dict({**BASE, "stage": "dpo", "pref_beta": 0.3})
    t = Trainer(cfg)
    with torch.no_grad():  # a different policy than the reference, so the loss is not log 2
        for p in t.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    units = t.schedule.step_units(0)
    chosen, rejected = units[0].docs

    def logp(model, doc):
        ids = torch.tensor([doc.input_ids])
        logits = model(input_ids=ids).logits.double()
        tgt = torch.tensor([doc.targets()])
        lp = torch.gather(F.log_softmax(logits, -1), -1, tgt.clamp_min(0)[..., None])[..., 0]
        return float(lp[tgt != IGNORE].sum())

    with torch.no_grad():
        pc, pr = logp(t.model, chosen), logp(t.model, rejected)
        rc, rr = logp(t.ref_model.lm, chosen), logp(t.ref_model.lm, rejected)
    want = -math.log(1 / (1 + math.exp(-0.3 * ((pc - rc) - (pr - rr)))))
    assert t.step(0)["loss"] == pytest.approx(want, rel=1e-10)


def test_packed_targets_never_cross_documents_and_padding_is_unsupervised():
    recs = [{"prompt": [5, 6], "response": [7, 8]}, {"prompt": [9], "response": [10, 11, 12]}, {"prompt": [4], "response": [4]}]
    units = build_units("sft", recs, cutoff=16, packing=True, eos=2)
    mb = collate(units + build_units("sft", recs[:1], 16, False, 2), pad_id=0)
    assert mb.targets[0].tolist()[:5] == [IGNORE, 7, 8, 2, IGNORE]  # doc 0 ends: nothing predicts doc 1's first token
    assert mb.position_ids[0].tolist()[5:10] == [0, 1, 2, 3, 4]
    assert (mb.targets[mb.doc_ids < 0] == IGNORE).all() and (mb.doc_ids[1, 5:] == -1).all()


@pytest.mark.parametrize("split", [(1, 4, 1), (2, 2, 1), (1, 1, 4), (2, 1, 2)])
def test_step_rows_depend_only_on_the_global_batch(split):
    units = build_units("sft", [{"prompt": [3], "response": [i + 3]} for i in range(10)], 8, False, 2)
    bs, ga, dp = split
    ref = StepSchedule(units, 1, 4, 1, seed=3)
    sched = StepSchedule(units, bs, ga, dp, seed=3)
    for step in range(3):
        assert [id(u) for u in sched.step_units(step)] == [id(u) for u in ref.step_units(step)]
        mine = [mb for r in range(dp) for mb in sched.micro_batches(step, r, 0)]
        assert sum(mb.input_ids.shape[0] for mb in mine) == 4


def test_tiled_logprobs_equal_untiled():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).double()
    h = torch.randn(3, 17, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 17))
    t[0, :5] = IGNORE
    full = token_logprobs(h, head, t)
    g_full = torch.autograd.grad(full.sum(), (h, head.weight))
    tiled = token_logprobs(h, head, t, chunk_tokens=4)
    g_tiled = torch.autograd.grad(tiled.sum(), (h, head.weight))
    assert torch.allclose(full, tiled, atol=1e-13) and all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_full, g_tiled))


@pytest.mark.parametrize("values,msg", [
    ({"sequence_paralel_size": 2}, "unknown keys sequence_paralel_size"),
    ({"sequence_parallel_mode": "spiral"}, "sequence_parallel_mode 'spiral' is unknown"),
    ({"sequence_parallel_size": 8, "cutoff_len": 4}, r"cutoff_len\(4\) must be"),
    ({"stage": "ppo"}, "stage 'ppo' is unknown"),
])
def test_bad_config_is_one_clear_error(values, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(values)


def test_bad_data_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_examples(p)
    with pytest.raises(DataError, match="empty"):
        build_units("sft", [], 8, False, 2)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "spbench", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("yaml_text,msg", [
    ("stage: sft\nsequence_parallel_mode: ulysses\nsequence_parallel_size: 3\n", "use method 'hybrid'"),
    ("stage: sft\ndataset: missing.jsonl\n", "dataset 'missing.jsonl' is not an existing file"),
    ("stage: [\n", "not valid YAML"),
    ("stage: sft\nsequence_parallel_size: 2\n", "sp(2) does not divide world(3)"),
    ("stage: sft\ndataset: EMPTY\n", "has no records"),
    ("stage: sft\nattention_kernel: cuda-cudnn\n", "needs CUDA tensors"),
])
def test_train_cli_bad_input_exits_2_with_one_line(tmp_path, yaml_text, msg):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "empty.jsonl").write_text("\n")
    yaml_text = yaml_text.replace("EMPTY", str(tmp_path / "empty.jsonl"))
    cfg.write_text(yaml_text + f"output_dir: {tmp_path / 'out'}\ndevice: cpu\n")
    r = run_cli("train", str(cfg), "--nproc", "3")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr


def test_train_cli_writes_metrics(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stage: sft\nsequence_parallel_size: 2\ncutoff_len: 32\nmax_steps: 2\nmax_samples: 8\n"
                   f"dtype: float64\ndevice: cpu\noutput_dir: {tmp_path / 'out'}\n")
    r = run_cli("train", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [0, 1] and all(math.isfinite(m["loss"]) for m in rows)
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["sequence_parallel_size"] == 2
    assert (tmp_path / "out" / "model.safetensors").exists()  # the final model, saved_pretrained
    assert "git_sha" in json.loads((tmp_path / "out" / "provenance.json").read_text())


def test_sp_on_a_model_whose_attention_it_cannot_reach_is_refused(tmp_path):
    """F12: a model class that does not call attention through AttentionInterface would train with SP silently
    off; preflight refuses it (one line) before any rank starts, and SP off still runs it."""
    from transformers import BloomConfig

    from runtime.models import ModelError
    from runtime.train import preflight

    BloomConfig(n_layer=1, hidden_size=8, n_head=2, vocab_size=300).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # preflight only checks that weights are there
    cfg = from_dict({"model_name_or_path": str(tmp_path), "sequence_parallel_size": 2, "device": "cpu"})
    with pytest.raises(ModelError, match="does not route attention through transformers' AttentionInterface") as e:
        preflight(cfg, 2)
    assert "\n" not in str(e.value)
    preflight(from_dict({"model_name_or_path": str(tmp_path), "device": "cpu"}), 1)  # SP off: transformers' sdpa
    preflight(from_dict({"model_name_or_path": "tiny", "sequence_parallel_size": 2, "device": "cpu"}), 2)
