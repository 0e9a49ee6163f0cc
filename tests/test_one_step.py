"""One training step: the memory model sees what the trainer resolves, and measurement paths run Trainer.step."""
from __future__ import annotations

import pytest

from runtime.config import from_dict
from runtime.memory import resolve_mlp_chunks
from runtime.train import Trainer
from spbench.memory.setup import Setup, tokens_per_gpu

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stage,batch", [("sft", 1), ("dpo", 1), ("dpo", 2)])
def test_memory_model_inputs_equal_the_trainers_resolved_features(stage, batch):
    cfg = from_dict({"model_name_or_path": "tiny", "stage": stage, "cutoff_len": 300, "max_samples": 8,
                     "per_device_train_batch_size": batch, "dtype": "float32", "device": "cpu",
                     "dataset": "synthetic-full"})  # rows of cutoff_len tokens: what the memory model sizes
    trainer = Trainer(cfg)
    setup = Setup.from_config(cfg, gpus=1)
    assert setup.features == trainer.features == cfg.memory_features
    assert tokens_per_gpu(setup, cfg.cutoff_len) == trainer.shard_tokens
    hidden = trainer.model.config.hidden_size
    assert resolve_mlp_chunks(setup.features, tokens_per_gpu(setup, cfg.cutoff_len), hidden) == trainer.mlp_chunks
    assert trainer.mlp_chunks == -(-(batch * (2 if stage == "dpo" else 1) * 300) // hidden)  # rows, not pairs
    tiled = [m.mlp.num_chunks for m in trainer.model.modules() if type(m.mlp if hasattr(m, "mlp") else None).__name__ == "TiledMLP"]
    assert tiled and set(tiled) == {trainer.mlp_chunks}
    if trainer.ref_model is not None:  # the reference forward is tiled the same way
        ref = [m.mlp.num_chunks for m in trainer.ref_model.modules() if type(getattr(m, "mlp", None)).__name__ == "TiledMLP"]
        assert set(ref) == {trainer.mlp_chunks}


def test_short_data_under_a_long_cutoff_gets_the_chunks_of_its_longest_row(tmp_path):
    """LLaMA-Factory configs carry cutoff_len 100000 for data of a few hundred tokens: the MLP is tiled for the
    longest row the data makes (the same on every rank), not for cutoff_len."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"instruction": "{"x" * 40 * i}", "output": "y"}}\n' for i in range(1, 5)))
    cfg = from_dict({"model_name_or_path": "tiny", "cutoff_len": 100000, "dataset": str(data), "dtype": "float32",
                     "device": "cpu"})
    trainer = Trainer(cfg)
    longest = 160 + 1 + 2  # the longest prompt and its newline, "y", eos
    assert trainer.shard_tokens == longest
    assert trainer.mlp_chunks == -(-longest // trainer.model.config.hidden_size)


def test_reference_forward_runs_before_the_policy_forward():
    """DPO: the frozen reference's log-probs come first, while no policy activation is alive."""
    cfg = from_dict({"model_name_or_path": "tiny", "stage": "dpo", "cutoff_len": 64, "max_samples": 4,
                     "dtype": "float32", "device": "cpu", "max_steps": 1})
    trainer = Trainer(cfg)
    order = []
    trainer.ref_model.register_forward_hook(lambda *_: order.append("ref"))
    trainer.policy.register_forward_hook(lambda *_: order.append("policy"))
    trainer.step(0)
    assert order[:2] == ["ref", "policy"]


def _count_mlp_calls(model) -> dict[int, list[int]]:
    """layer index → [tokens of each call of that layer's (inner) MLP module], filled while the model runs."""
    calls: dict[int, list[int]] = {}
    for i, layer in enumerate(model.model.layers):
        inner = layer.mlp.mlp if type(layer.mlp).__name__ == "TiledMLP" else layer.mlp
        calls[i] = []
        inner.register_forward_pre_hook(lambda m, args, i=i: calls[i].append(args[0].shape[-2]))
    return calls


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("ckpt", [True, False])
def test_tiled_mlp_runs_each_chunk_once_forward_and_once_in_backward(stage, ckpt):
    """Issue 10 §2: with layer checkpointing and the tiled MLP, one step calls each layer's MLP 2 × chunks times
    (forward + one recompute per chunk; the old per-chunk checkpoint made it 3 × chunks − 1: the layer recompute
    re-ran chunks before its early stop); the no-grad DPO reference calls it chunks times."""
    chunks = 4
    cfg = from_dict({"model_name_or_path": "tiny", "stage": stage, "cutoff_len": 40, "max_samples": 1,
                     "dataset": "synthetic-full", "dtype": "float32", "device": "cpu", "max_steps": 1,
                     "tiled_mlp_chunks": chunks, "gradient_checkpointing": ckpt})
    trainer = Trainer(cfg)
    policy = _count_mlp_calls(trainer.model)
    ref = _count_mlp_calls(trainer.ref_model.lm) if stage == "dpo" else {}
    trainer.step(0)
    for calls in policy.values():
        assert len(calls) == 2 * chunks and calls[:chunks] == calls[chunks:], calls
    for calls in ref.values():
        assert len(calls) == chunks, calls
