"""Model presets (architecture configs shipped as data, random weights) and local checkpoints."""
from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from .errors import InputError

_ARCH = {"qwen2": Qwen2Config, "llama": LlamaConfig}


class ModelError(InputError):
    """An unknown preset or an unusable checkpoint path."""


def presets() -> dict[str, dict]:
    """Preset name → architecture fields (runtime/presets/presets.json)."""
    text = resources.files("runtime").joinpath("presets/presets.json").read_text()
    return json.loads(text)["presets"]


def is_preset(name: str) -> bool:
    return name in presets()


def model_config(name_or_path: str) -> PretrainedConfig:
    """The transformers config of a preset name or a local checkpoint directory."""
    table = presets()
    if name_or_path in table:
        fields = dict(table[name_or_path])
        cls = _ARCH[fields.pop("architecture")]
        return cls(**fields, use_cache=False)
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    near = difflib.get_close_matches(name_or_path, table, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ModelError(f"model {name_or_path!r} is neither a preset nor a local checkpoint dir with config.json; "
                     f"{hint}presets: {', '.join(table)}")


def build_model(name_or_path: str, dtype: torch.dtype, attn_implementation: str, seed: int = 0) -> torch.nn.Module:
    """A causal LM: presets get random weights from `seed`; checkpoint dirs load their weights."""
    config = model_config(name_or_path)
    config._attn_implementation = attn_implementation
    if is_preset(name_or_path):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    return model
