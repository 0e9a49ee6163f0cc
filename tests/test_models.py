import pytest
import torch

from runtime.models import ModelError, build_model, model_config, presets
from spbench.modelscmd import parameters


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_parameter_formula_matches_the_built_model(name):
    model = build_model(name, torch.float32, "sdpa")
    assert parameters(presets()[name]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,billions", [("qwen2.5-0.5b", 0.49), ("qwen2.5-7b", 7.62), ("qwen2.5-72b", 72.71),
                                           ("llama-3.1-8b", 8.03)])
def test_presets_have_the_public_parameter_counts(name, billions):
    assert parameters(presets()[name]) / 1e9 == pytest.approx(billions, abs=0.01)


def test_unknown_model_suggests_the_nearest_preset():
    with pytest.raises(ModelError, match="did you mean 'qwen2.5-7b'"):
        model_config("qwen2.5-7")
