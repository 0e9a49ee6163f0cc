"""Training configuration: one dataclass, LLaMA-Factory key names where they exist, YAML in and out."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .attention import METHODS
from .attention.kernels import KERNELS
from .dsconfig import read_deepspeed_json
from .errors import InputError
from .lf import translate
from .losses import PREF_LOSSES
from .memory import MemoryFeatures

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULERS = ("constant", "linear", "cosine")
ATTENTION = ("auto", "runtime", "sdpa")
FINETUNING = ("full", "lora")
_MEMORY = MemoryFeatures()  # the one set of memory-feature defaults (runtime/memory.py)


class ConfigError(InputError):
    """A config value that cannot work; the message names the key, the value and the fix."""


@dataclass
class TrainConfig:
    """One SFT or DPO run. Every field has a default; YAML keys are these field names."""

    model_name_or_path: str = field(default="tiny", metadata={"doc": "preset name (`spbench models` lists them) or a local HF checkpoint directory"})
    stage: str = field(default="sft", metadata={"doc": "sft | dpo"})
    pref_loss: str = field(default="sigmoid", metadata={"doc": "dpo loss: sigmoid | ipo | simpo | hinge"})
    pref_beta: float = field(default=0.1, metadata={"doc": "dpo β (inverse temperature)"})
    simpo_gamma: float = field(default=0.5, metadata={"doc": "simpo target reward margin γ"})
    dataset: str = field(default="synthetic", metadata={"doc": "synthetic (random lengths) | synthetic-full (every sequence cutoff_len tokens) | comma-separated dataset names of dataset_dir/dataset_info.json or paths of .json/.jsonl files (alpaca, sharegpt, openai messages; dpo: their ranking forms or prompt/chosen/rejected)"})
    dataset_dir: str = field(default="data", metadata={"doc": "folder of dataset_info.json (LLaMA-Factory's format) and the files it names"})
    template: str = field(default="auto", metadata={"doc": "auto or a LLaMA-Factory template name: the checkpoint tokenizer's chat template when it has one, else the plain format | plain"})
    max_samples: int | None = field(default=None, metadata={"doc": "use at most this many records (synthetic: how many to make, default 64)"})
    cutoff_len: int = field(default=4096, metadata={"doc": "tokens per sequence after truncation (packed rows hold up to this many)"})
    packing: bool = field(default=False, metadata={"doc": "pack several samples per row; attention stays within each sample"})
    sequence_parallel_size: int = field(default=1, metadata={"doc": "ranks that share one sequence (1 = SP off)"})
    sequence_parallel_mode: str = field(default="zigzag", metadata={"doc": "ulysses | ring | zigzag | hybrid | allgather"})
    ulysses_degree: int | str = field(default="auto", metadata={"doc": "hybrid only: Ulysses degree, or auto"})
    attention: str = field(default="auto", metadata={"doc": "auto (the runtime's SP attention when sequence_parallel_size > 1 or packing, else transformers' sdpa) | runtime | sdpa"})
    attention_kernel: str = field(default="auto", metadata={"doc": "local attention kernel: auto | " + " | ".join(KERNELS)})
    per_device_train_batch_size: int = field(default=1, metadata={"doc": "rows per micro-batch (dpo: pairs)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"doc": "micro-batches per optimizer step"})
    max_steps: int | None = field(default=None, metadata={"doc": "optimizer steps; overrides num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"doc": "passes over the data when max_steps is not set"})
    learning_rate: float = field(default=1e-5, metadata={"doc": "peak learning rate (AdamW)"})
    lr_scheduler_type: str = field(default="constant", metadata={"doc": "constant | linear | cosine (after warmup)"})
    warmup_steps: int = field(default=0, metadata={"doc": "linear warmup steps"})
    warmup_ratio: float = field(default=0.0, metadata={"doc": "warmup as a fraction of the total steps, ⌈ratio × steps⌉ (used when warmup_steps is 0)"})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"doc": "clip the reduced gradient to this norm (0 = no clipping)"})
    dtype: str = field(default="bfloat16", metadata={"doc": "float64 | float32 | bfloat16 (parameters and compute)"})
    gradient_checkpointing: bool = field(default=_MEMORY.gradient_checkpointing, metadata={"doc": "recompute each decoder layer in backward"})
    tiled_loss_chunk: int | None = field(default=_MEMORY.tiled_loss_chunk, metadata={"doc": "tokens per logits chunk (null = full logits)"})
    tiled_mlp_chunks: int | str | None = field(default=_MEMORY.tiled_mlp_chunks, metadata={"doc": "sequence chunks per MLP call: an int, auto (≈ hidden_size tokens each over the rows × cutoff_len / SP tokens a rank holds), or null"})
    tiled_norm_chunk: int | None = field(default=_MEMORY.tiled_norm_chunk, metadata={"doc": "tokens per RMSNorm chunk: forward bitwise transformers', backward recomputes per chunk instead of holding 5 fp32 tokens × hidden temporaries (null = transformers' RMSNorm)"})
    checkpoint_offload: bool = field(default=_MEMORY.checkpoint_offload, metadata={"doc": "keep the checkpointed hidden states in CPU memory (needs gradient_checkpointing)"})
    deepspeed: str | None = field(default=None, metadata={"doc": "path to a DeepSpeed JSON config (ZeRO-2/3, offload) or null"})
    seed: int = field(default=0, metadata={"doc": "seed of weights (presets), data order and synthetic data"})
    output_dir: str = field(default="out/run", metadata={"doc": "metrics.jsonl, train_config.json, provenance.json, checkpoints and the final model go here"})
    device: str = field(default="auto", metadata={"doc": "auto (cuda when available) | cpu | cuda"})
    val_size: float = field(default=0.0, metadata={"doc": "hold out this fraction (< 1) or number (≥ 1) of the records for evaluation, chosen by the seed"})
    eval_dataset: str | None = field(default=None, metadata={"doc": "evaluate on these datasets (named as dataset) instead of a val_size hold-out"})
    eval_strategy: str = field(default="no", metadata={"doc": "no | steps (every eval_steps optimizer steps) | epoch (after each pass over the data)"})
    eval_steps: int = field(default=500, metadata={"doc": "optimizer steps between evaluations (eval_strategy: steps)"})
    per_device_eval_batch_size: int = field(default=1, metadata={"doc": "rows per evaluation micro-batch (dpo: pairs)"})
    save_strategy: str = field(default="steps", metadata={"doc": "no | steps (a checkpoint every save_steps steps) | epoch; the final model goes to output_dir unless no"})
    save_steps: int = field(default=500, metadata={"doc": "optimizer steps between checkpoints (save_strategy: steps)"})
    save_total_limit: int | None = field(default=None, metadata={"doc": "keep at most this many checkpoints (the oldest go first, never the newest); null = all"})
    save_only_model: bool = field(default=False, metadata={"doc": "checkpoints hold the model only (no optimizer, scheduler, RNG: not resumable)"})
    resume_from_checkpoint: str | bool | None = field(default=None, metadata={"doc": "continue from this checkpoint-N folder, or true for the latest complete one in output_dir"})
    ddp_timeout: int = field(default=1800, metadata={"doc": "seconds a collective waits for the other ranks before the run fails"})
    finetuning_type: str = field(default="full", metadata={"doc": "full (every weight trains) | lora (peft adapters; the base stays frozen; dpo's reference is the model with adapters disabled) | freeze is not implemented"})
    lora_rank: int = field(default=8, metadata={"doc": "lora: rank r of each adapter"})
    lora_alpha: int | None = field(default=None, metadata={"doc": "lora: scale α (the update is α/r · B A); null = 2 × lora_rank"})
    lora_dropout: float = field(default=0.0, metadata={"doc": "lora: dropout on each adapter's input (0 in parity cases: dropout draws differ by layout)"})
    lora_target: str = field(default="all", metadata={"doc": "lora: all (every nn.Linear of the decoder layers; not lm_head or embeddings) | comma-separated module names, e.g. q_proj,v_proj"})

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.stage in ("sft", "dpo"), f"stage {self.stage!r} is unknown; use sft or dpo")
        need(self.pref_loss in PREF_LOSSES, f"pref_loss {self.pref_loss!r} is unknown; use one of {', '.join(PREF_LOSSES)}")
        need(self.pref_beta > 0 and math.isfinite(self.pref_beta), f"pref_beta must be > 0, got {self.pref_beta}")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be a number > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay), f"weight_decay must be ≥ 0, got {self.weight_decay}")
        need(self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm),
             f"max_grad_norm must be ≥ 0 (0 = no clipping), got {self.max_grad_norm}")
        need(self.warmup_steps >= 0, f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self._check_eval_and_save(need)
        need(self.ddp_timeout > 0, f"ddp_timeout must be > 0 seconds, got {self.ddp_timeout}")
        need(bool(self.dataset.strip(",")), "dataset is empty; name a dataset, a file, or synthetic")
        need(self.sequence_parallel_mode in METHODS,
             f"sequence_parallel_mode {self.sequence_parallel_mode!r} is unknown; use one of {', '.join(METHODS)}")
        need(self.sequence_parallel_size >= 1, f"sequence_parallel_size must be ≥ 1, got {self.sequence_parallel_size}")
        need(self.ulysses_degree == "auto" or (isinstance(self.ulysses_degree, int) and self.ulysses_degree >= 1),
             f"ulysses_degree must be 'auto' or a positive integer, got {self.ulysses_degree!r}")
        need(self.attention_kernel in ("auto", *KERNELS), f"attention_kernel {self.attention_kernel!r} is unknown; use auto or one of {', '.join(KERNELS)}")
        need(self.cutoff_len >= max(2, self.sequence_parallel_size),
             f"cutoff_len({self.cutoff_len}) must be ≥ 2 and ≥ sequence_parallel_size({self.sequence_parallel_size})")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be ≥ 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be ≥ 1")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be ≥ 1, got {self.max_steps}")
        need(self.num_train_epochs > 0, f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        need(self.max_samples is None or self.max_samples >= 1, f"max_samples must be ≥ 1, got {self.max_samples}")
        need(self.lr_scheduler_type in SCHEDULERS, f"lr_scheduler_type {self.lr_scheduler_type!r} is unknown; use one of {', '.join(SCHEDULERS)}")
        need(self.dtype in DTYPES, f"dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        try:
            self.memory_features  # noqa: B018 — MemoryFeatures validates the five memory keys
        except ValueError as e:
            raise ConfigError(str(e)) from None
        need(self.attention in ATTENTION, f"attention {self.attention!r} is unknown; use one of {', '.join(ATTENTION)}")
        need(self.attention != "sdpa" or (self.sequence_parallel_size == 1 and not self.packing),
             "attention: sdpa (transformers' own) cannot shard a sequence or keep packed samples apart; "
             "use attention: auto or runtime with sequence_parallel_size > 1 or packing")
        need(self.device in ("auto", "cpu", "cuda"), f"device {self.device!r} is unknown; use auto, cpu or cuda")
        self._check_lora(need)
        if self.deepspeed is not None:
            read_deepspeed_json(self.deepspeed)  # exists and holds a JSON object (its contents: at preflight)

    def _check_eval_and_save(self, need) -> None:
        """The evaluation and checkpoint rules (resume_from_checkpoint's folder is checked by the launcher)."""
        need(self.val_size >= 0 and (self.val_size < 1 or self.val_size == int(self.val_size)),
             f"val_size must be a fraction in [0, 1) or a whole number of records, got {self.val_size}")
        need(self.eval_strategy in ("no", "steps", "epoch"), f"eval_strategy {self.eval_strategy!r} is unknown; use no, steps or epoch")
        need(self.eval_steps >= 1 and self.per_device_eval_batch_size >= 1, "eval_steps and per_device_eval_batch_size must be ≥ 1")
        need(not (self.val_size and self.eval_dataset), "give val_size or eval_dataset, not both")
        need(self.eval_strategy == "no" or bool(self.val_size or self.eval_dataset),
             f"eval_strategy {self.eval_strategy} has nothing to evaluate; set val_size or eval_dataset")
        need(not self.val_size or self.eval_strategy != "no",
             "val_size holds out records but eval_strategy is no; set eval_strategy: steps or epoch, or val_size: 0")
        need(self.save_strategy in ("no", "steps", "epoch"), f"save_strategy {self.save_strategy!r} is unknown; use no, steps or epoch")
        need(self.save_steps >= 1, f"save_steps must be ≥ 1, got {self.save_steps}")
        need(self.save_total_limit is None or self.save_total_limit >= 1, f"save_total_limit must be ≥ 1 or null, got {self.save_total_limit}")

    def _check_lora(self, need) -> None:
        """The finetuning_type and lora_* rules (lora_target's names are checked against the model at preflight)."""
        need(self.finetuning_type != "freeze", "finetuning_type freeze is not implemented; use full or lora")
        need(self.finetuning_type in FINETUNING, f"finetuning_type {self.finetuning_type!r} is unknown; use full or lora")
        need(self.lora_rank >= 1, f"lora_rank must be ≥ 1, got {self.lora_rank}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0 or null (2 × lora_rank), got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(bool(self.lora_target_names), f"lora_target {self.lora_target!r} names no module; use all or e.g. q_proj,v_proj")

    @property
    def memory_features(self) -> MemoryFeatures:
        """The memory features this run uses (runtime/memory.py)."""
        return MemoryFeatures(tiled_loss_chunk=self.tiled_loss_chunk, tiled_mlp_chunks=self.tiled_mlp_chunks,
                              tiled_norm_chunk=self.tiled_norm_chunk, checkpoint_offload=self.checkpoint_offload,
                              gradient_checkpointing=self.gradient_checkpointing)

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """lora_target as module names (("all",) for all); checked against the model at preflight."""
        return tuple(n.strip() for n in self.lora_target.split(",") if n.strip())

    @property
    def rows_per_micro_batch(self) -> int:
        """Sequences in one micro-batch: per_device_train_batch_size, × 2 for DPO (chosen and rejected rows)."""
        return self.per_device_train_batch_size * (2 if self.stage == "dpo" else 1)

    @property
    def uses_sp_attention(self) -> bool:
        """Whether attention runs through the runtime (SP, packing, or asked for) instead of transformers' sdpa."""
        if self.attention == "auto":
            return self.sequence_parallel_size > 1 or self.packing
        return self.attention == "runtime"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def config_fields() -> dict[str, str]:
    """Key → documentation, for help texts and the README."""
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(TrainConfig)}


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """TrainConfig from a mapping of spbench keys; unknown keys are one error naming all of them."""
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {', '.join(unknown)}; the README lists the keys")
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{key: _typed(key, value, hints[key], source) for key, value in values.items()})


def _typed(key: str, value: Any, hint, source: str) -> Any:
    """`value` checked against the declared type of field `key` (one line naming the key when it does not fit).
    A float field takes a number written as a string ("5e-6" is a string to YAML, a number to LLaMA-Factory's
    users); nothing else is converted: `packing: "no"` is an error, not True."""
    kinds = typing.get_args(hint) or (hint,)
    expected = " or ".join({int: "an integer", float: "a number", bool: "true or false", str: "a string",
                            type(None): "null"}[k] for k in kinds)
    if (value is None and type(None) in kinds) or (isinstance(value, bool) and bool in kinds):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and (int in kinds or float in kinds):
        return value if int in kinds else float(value)
    if isinstance(value, float) and float in kinds:
        return value
    if isinstance(value, str) and str in kinds:
        return value
    if isinstance(value, str) and float in kinds:
        try:
            return float(value)
        except ValueError:
            pass
    hint = "; a fraction of the total steps is warmup_ratio" if key == "warmup_steps" and isinstance(value, float) else ""
    raise ConfigError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__}){hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                notes: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file (plus overrides, key → value) into a validated TrainConfig.

    LLaMA-Factory keys are translated, accepted or refused (runtime/lf.py); what spbench does differently from
    LLaMA-Factory for this config is appended to `notes`, one line each."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(values).__name__}")
    ours, said = translate({**values, **(overrides or {})}, set(config_fields()), str(path))
    if notes is not None:
        notes += said
    return from_dict(ours, source=str(path))
