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


def model_config(name_or_path: str, num_layers: int | None = None) -> PretrainedConfig:
    """The transformers config of a preset name or a local checkpoint directory. `num_layers` (presets only):
    that many decoder layers instead of the preset's, every other field as shipped (memory traces at reduced
    depth, spbench/memory/traced.py)."""
    table = presets()
    if num_layers is not None and (name_or_path not in table or num_layers < 1):
        raise ModelError(f"num_layers={num_layers}: a depth override needs a preset and ≥ 1 layer")
    if name_or_path in table:
        fields = dict(table[name_or_path])
        cls = _ARCH[fields.pop("architecture")]
        if num_layers is not None:
            fields["num_hidden_layers"] = num_layers
        return cls(**fields, use_cache=False)
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:  # broken JSON, unknown model_type, missing fields
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"checkpoint {name_or_path!r}: config.json is unusable ({first[:200]})") from None
    near = difflib.get_close_matches(name_or_path, table, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ModelError(f"model {name_or_path!r} is neither a preset nor a local checkpoint dir with config.json; "
                     f"{hint}presets: {', '.join(table)}")


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def check_weights(name_or_path: str) -> None:
    """ModelError unless `name_or_path` is a preset (random weights) or a checkpoint dir holding weight files."""
    if is_preset(name_or_path):
        return
    path = Path(name_or_path)
    if not any(f for pattern in WEIGHT_FILES for f in path.glob(pattern)):
        raise ModelError(f"checkpoint {name_or_path!r} has no weights ({' or '.join(WEIGHT_FILES)}); give the folder "
                         f"save_pretrained wrote, or a preset name for random weights")


def head_counts(config: PretrainedConfig) -> tuple[int, int]:
    """(query heads, key/value heads) of a model config; kv = query heads where the config has no GQA field."""
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def check_attention_reachable(config: PretrainedConfig) -> None:
    """Raise ModelError unless the causal-LM class of `config` calls attention through transformers'
    AttentionInterface: otherwise the runtime's SP attention would never run and SP would be silently off, every
    rank holding the whole sequence (FAULTS.md F12)."""
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if cls is None or not getattr(cls, "_supports_attention_backend", False):
        name = cls.__name__ if cls is not None else f"model type {config.model_type!r}"
        raise ModelError(f"{name} does not route attention through transformers' AttentionInterface, so sequence "
                         f"parallelism cannot reach it (it would run silently off); use sequence_parallel_size: 1, "
                         f"or a model that does (qwen2, llama, ...)")


def build_model(name_or_path: str, dtype: torch.dtype, attn_implementation: str, seed: int = 0,
                num_layers: int | None = None) -> torch.nn.Module:
    """A causal LM: presets get random weights from `seed`; checkpoint dirs load their weights. `num_layers`:
    model_config's depth override (presets only)."""
    config = model_config(name_or_path, num_layers)
    if attn_implementation != "sdpa":
        check_attention_reachable(config)
    config._attn_implementation = attn_implementation
    if is_preset(name_or_path):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    return model


def placed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` on `device`: moved only if some tensor is elsewhere (a checkpoint loaded on the host), so a model
    built in place (presets, fake-tensor traces) is never copied."""
    tensors = [*model.parameters(), *model.buffers()]
    return model if all(t.device == device for t in tensors) else model.to(device)
