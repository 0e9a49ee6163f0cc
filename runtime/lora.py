"""LoRA through peft: adapters on the decoder's linear layers, the base model frozen.

`apply_lora(model, cfg)` injects the adapters into `model` in place (peft's `get_peft_model`) and returns the
`PeftModel` around it; `model` stays the transformers model, so `model.base_model` (the decoder) and
`model.get_output_embeddings()` (lm_head) are what the trainer's `TokenLogProbs` calls, adapters inside.
Adapter weights are drawn from `cfg.seed` in a forked RNG: every rank and the SP-off reference get the same
adapters, and the caller's RNG stream is untouched. peft's default init (A: Kaiming-uniform, B: 0) makes
the adapted model equal the base model at step 0, as in LLaMA-Factory and TRL.

DPO's reference log-probs come from the same model under `adapters_disabled(peft_model)` (peft's
`disable_adapter()`): no second model in memory. The linear layers may sit inside the tiled MLP wrapper
(runtime/memory.py); peft matches module names by suffix, so `gate_proj`/`up_proj`/`down_proj` are found there.

    peft_model = apply_lora(model, cfg)          # model: Qwen2ForCausalLM, now with lora_A/lora_B inside
    params = trainable_parameters(model)         # only the adapters
    with torch.no_grad(), adapters_disabled(peft_model):
        ref = model.base_model(input_ids=ids).last_hidden_state   # the base model's hidden states
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .config import ConfigError, TrainConfig

ALL = "all"


def lora_alpha(cfg: TrainConfig) -> int:
    """The adapter scale α of `cfg`: lora_alpha, or 2 × lora_rank when it is null (LLaMA-Factory's default)."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Qualified name → nn.Linear for every linear layer LoRA may adapt: all but the output and input embeddings.

    E.g. tiny Qwen2: model.layers.0.self_attn.q_proj, ..., model.layers.1.mlp.down_proj (lm_head excluded)."""
    excluded = {id(model.get_output_embeddings()), id(model.get_input_embeddings())}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in excluded}


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of `linear_modules(model)`, sorted: what `lora_target` may name."""
    return sorted({n.rsplit(".", 1)[-1] for n in linear_modules(model)})


def meta_model(model_config) -> nn.Module:
    """The architecture of `model_config` with parameters on the meta device (no memory, no init time)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def resolve_targets(target: str, known: list[str]) -> list[str]:
    """`lora_target` ("all" or "q_proj,v_proj") as a list of module names out of `known`; ConfigError naming
    the known ones when a name is not among them. E.g. ("all", [k, q]) → [k, q]; ("q,x", [k, q]) → error."""
    names = [n.strip() for n in target.split(",") if n.strip()]
    if names == [ALL]:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"lora_target {target!r}: no linear module named {', '.join(unknown) or '(none)'} in "
                          f"the decoder; known: all, {', '.join(known)}")
    return names


def check_lora(cfg: TrainConfig, model_config) -> None:
    """Preflight: with finetuning_type lora, every `lora_target` name must be a linear module of the model."""
    if cfg.finetuning_type == "lora":
        resolve_targets(cfg.lora_target, linear_names(meta_model(model_config)))


def adapter_parameter_count(model: nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters LoRA adds to `model` (may be a meta model): r × (in + out) per adapted linear layer."""
    return sum(rank * (m.in_features + m.out_features) for n, m in linear_modules(model).items()
               if n.rsplit(".", 1)[-1] in targets)


def apply_lora(model: nn.Module, cfg: TrainConfig):
    """Inject LoRA adapters into `model` in place (base weights frozen, adapters trainable, in the model's
    dtype) and return the peft `PeftModel` wrapping it. Adapter init is seeded by `cfg.seed` (same on every rank)."""
    import peft

    targets = resolve_targets(cfg.lora_target, linear_names(model))
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=lora_alpha(cfg), lora_dropout=cfg.lora_dropout,
                             target_modules=targets, bias="none")
    base = next(model.parameters())
    device = base.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings(), \
            _real_adapters_over(base):
        # peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning per rank, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(cfg.seed)
        # autocast_adapter_dtype=False: adapters in the model's dtype (float64 parity runs stay float64)
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    return wrapped


def _real_adapters_over(base: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where the base model is built on fake tensors (spbench's memory traces: FakeTensorMode), the adapters are made
    as real tensors (r-wide: small): peft moves each adapter with Module.to, which torch does for a fake Parameter by
    swapping it, and a fake Parameter refuses the swap (it carries a weakref). Elsewhere a no-op."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    return unset_fake_temporarily() if isinstance(base, FakeTensor) else contextlib.nullcontext()


def adapters_disabled(peft_model) -> contextlib.AbstractContextManager:
    """Context in which the model computes as its frozen base (DPO's reference); a no-op without LoRA."""
    return contextlib.nullcontext() if peft_model is None else peft_model.disable_adapter()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: all of them (full), only the adapters (lora)."""
    return [p for p in model.parameters() if p.requires_grad]
