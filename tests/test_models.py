import pytest
import torch

from runtime.models import ModelError, build_model, model_config
from spbench.memory.setup import shape_of


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_parameter_formula_matches_the_built_model(name):
    model = build_model(name, torch.float32, "sdpa")
    assert shape_of(name).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,billions", [("qwen2.5-0.5b", 0.49), ("qwen2.5-7b", 7.62), ("qwen2.5-72b", 72.71),
                                           ("llama-3.1-8b", 8.03)])
def test_presets_have_the_public_parameter_counts(name, billions):
    assert shape_of(name).params / 1e9 == pytest.approx(billions, abs=0.01)


def test_unknown_model_suggests_the_nearest_preset():
    with pytest.raises(ModelError, match="did you mean 'qwen2.5-7b'"):
        model_config("qwen2.5-7")


def test_local_checkpoint_loads_its_weights_and_trains(tmp_path):
    """A checkpoint dir (no hub): its weights load; without tokenizer files, text falls back to bytes."""
    from runtime.config import from_dict
    from runtime.records import ByteTokenizer
    from runtime.train import Trainer

    model = build_model("tiny", torch.float32, "sdpa", seed=5)
    model.save_pretrained(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "say hello", "output": "hello world"}\n' * 4)
    t = Trainer(from_dict({"model_name_or_path": str(tmp_path), "dataset": str(data), "dtype": "float32",
                           "cutoff_len": 64, "max_steps": 1, "device": "cpu"}))
    assert isinstance(t.tokenizer, ByteTokenizer)
    assert t.schedule.units[0].docs[0].input_ids[:3] == [ord("s") + 3, ord("a") + 3, ord("y") + 3]
    loaded = t.model.state_dict()  # keys of the plain model even where the MLP is tiled
    assert all(torch.equal(loaded[n], p) for n, p in model.named_parameters())
    assert torch.isfinite(torch.tensor(t.step(0)["loss"]))


def test_checkpoint_tokenizer_is_used_when_shipped(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from runtime.config import from_dict
    from runtime.records import CheckpointTokenizer, load_tokenizer, read_records

    words = ["<pad>", "</s>", "<unk>", "say", "hello", "world"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, CheckpointTokenizer) and (tok.pad_id, tok.eos_id) == (0, 1)
    (tmp_path / "d.jsonl").write_text('{"instruction": "say hello", "output": "hello world"}\n')
    cfg = from_dict({"model_name_or_path": str(tmp_path), "dataset": str(tmp_path / "d.jsonl")})
    assert read_records(cfg, tok) == [{"turns": [[[3, 4], [4, 5]]]}]
