"""Evaluation paths the parity cases do not take: eval_dataset instead of a hold-out, eval_strategy epoch, the
val_size split, and the rules that make an evaluation config one clear error."""
from __future__ import annotations

import json

import pytest

from runtime.config import ConfigError, from_dict
from runtime.evaluate import eval_due
from runtime.records import split_records
from runtime.train import Trainer

BASE = {"model_name_or_path": "tiny", "cutoff_len": 40, "dtype": "float64", "device": "cpu", "save_strategy": "no"}


def test_eval_dataset_is_evaluated_and_equals_its_own_loss(tmp_path):
    rows = [{"instruction": f"say {i}", "output": f"{i} {i}"} for i in range(6)]
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    t = Trainer(from_dict({**BASE, "dataset": str(train), "eval_dataset": str(held), "eval_strategy": "epoch",
                           "num_train_epochs": 2, "per_device_train_batch_size": 3}))
    t.train()
    assert [m["step"] for m in t.eval_history] == [1, 3]  # 6 rows / batch 3: each epoch ends after 2 steps
    assert t.eval_history[0]["eval_tokens"] == sum(u.supervised() for u in t.eval_schedule.units)
    # an evaluation before any update, on the rows of step 0, is step 0's loss (same shards, same global rule)
    from runtime.evaluate import evaluate

    before = Trainer(from_dict({**BASE, "dataset": str(held), "eval_dataset": str(held), "eval_strategy": "steps",
                                "per_device_train_batch_size": 3, "max_steps": 1, "learning_rate": 1e-3}))
    assert evaluate(before, -1)["eval_loss"] == pytest.approx(before.step(0)["loss"], rel=1e-12)


def test_eval_due_and_split_rules():
    assert [s for s in range(6) if eval_due("steps", 2, 99, s, 5)] == [1, 3, 5]
    assert [s for s in range(7) if eval_due("epoch", 99, 3, s, 6)] == [2, 5, 6]
    assert not any(eval_due("no", 1, 1, s, 5) for s in range(6))
    records = [{"prompt": [i], "response": [i]} for i in range(10)]
    train, held = split_records(records, 0.25, seed=3)
    assert len(held) == 3 and sorted(train + held, key=lambda r: r["prompt"]) == records  # ⌈2.5⌉ held out
    assert split_records(records, 0.25, seed=3) == (train, held) and split_records(records, 4, seed=3)[1] != held
    with pytest.raises(ConfigError, match="leave some to train on"):
        split_records(records, 10, seed=0)


@pytest.mark.parametrize("values,msg", [
    ({"val_size": 0.1}, "eval_strategy is no"), ({"eval_strategy": "steps"}, "nothing to evaluate"),
    ({"val_size": 0.1, "eval_dataset": "x.json", "eval_strategy": "steps"}, "not both"),
    ({"val_size": 2.5, "eval_strategy": "steps"}, "whole number"), ({"eval_strategy": "always"}, "unknown"),
])
def test_bad_eval_configs_are_one_error(values, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict({**BASE, **values})
