"""LLaMA-Factory configs read as they are: a table of its keys saying what spbench does with each.

A key is one of: spbench's own (TrainConfig, same name and meaning), **ignored** (it does not change the
training; `note` says where spbench differs), **translated** to spbench keys, or **refused** with the reason
(it would change the training in a way spbench does not implement) unless its value is one that changes nothing.
Anything else is unknown; every unknown and refused key of a config is named in one error, not one per run.
No near-name guessing: `save_steps` is not `max_steps`.

A config is read as LLaMA-Factory's when it holds any key of the table below (do_train, finetuning_type,
template, bf16, ...); then the keys it leaves out take LLaMA-Factory's defaults where spbench's differ (LF_DEFAULTS),
and a note lists them, so a config brought over trains as it did there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import InputError


class LFKeyError(InputError):
    """Unknown or refused keys of a config (all of them, in one line)."""


@dataclass(frozen=True)
class LFKey:
    action: str  # "ignore" | "translate" | "refuse"
    note: str  # what spbench does with it (the README table); for "refuse", the reason
    harmless: tuple = ()  # refuse: values that change nothing, accepted silently
    to: Callable[[Any], dict] | None = None  # translate: value → spbench keys (raises ValueError on a bad value)


def _flag(key: str, on: Callable[[], dict], off: dict | None = None) -> Callable[[Any], dict]:
    def f(v: Any) -> dict:
        if not isinstance(v, bool):
            raise ValueError(f"{key} must be true or false, got {v!r}")
        return on() if v else (off or {})
    return f


def _one_of(key: str, table: dict[str, dict]) -> Callable[[Any], dict]:
    def f(v: Any) -> dict:
        if v not in table:
            raise ValueError(f"{key} {v!r} is not supported; use one of {', '.join(table)}")
        return table[v]
    return f


_BF16 = "dtype: bfloat16 — parameters, gradients and AdamW states in bfloat16 (LLaMA-Factory's pure_bf16); bf16 " \
        "mixed precision keeps float32 master weights, which spbench has only under DeepSpeed (its bf16 optimizer)"
IGNORED = "ignore"

LF_KEYS: dict[str, LFKey] = {
    # accepted: they do not change the training
    "do_train": LFKey("refuse", "spbench only trains: do_train: false would do nothing", harmless=(True,)),
    "trust_remote_code": LFKey(IGNORED, "spbench never runs a checkpoint's own code: presets and transformers architectures only"),
    "overwrite_cache": LFKey(IGNORED, "spbench tokenizes in memory each run; there is no cache"),
    "preprocessing_num_workers": LFKey(IGNORED, "tokenizing runs in the launcher, before the ranks start"),
    "dataloader_num_workers": LFKey(IGNORED, "micro-batches are built in the rank from the step schedule"),
    "cache_dir": LFKey(IGNORED, "nothing is downloaded or cached"),
    "logging_steps": LFKey(IGNORED, "metrics.jsonl gets every step; progress prints every 10 steps off a TTY"),
    "report_to": LFKey(IGNORED, "metrics go to output_dir/metrics.jsonl only"),
    "run_name": LFKey(IGNORED, "runs are named by output_dir"),
    "plot_loss": LFKey(IGNORED, "no plot is written; metrics.jsonl holds the curve"),
    "overwrite_output_dir": LFKey(IGNORED, "spbench always replaces the metrics of a previous run in output_dir"),
    "shuffle_for_sequence_parallel": LFKey(IGNORED, "spbench's data order depends only on seed and global batch, never on SP"),
    "enable_liger_kernel": LFKey(IGNORED, "spbench has its own tiled loss and MLP (tiled_loss_chunk, tiled_mlp_chunks)"),
    "do_eval": LFKey(IGNORED, "evaluation runs when eval_strategy is steps or epoch"),
    "do_predict": LFKey("refuse", "generation is not implemented", harmless=(False,)),
    # translated
    "bf16": LFKey("translate", _BF16, to=_flag("bf16", lambda: {"dtype": "bfloat16"})),
    "pure_bf16": LFKey("translate", "dtype: bfloat16", to=_flag("pure_bf16", lambda: {"dtype": "bfloat16"})),
    "fp16": LFKey("refuse", "fp16 needs loss scaling, which spbench does not do; use bf16: true", harmless=(False,)),
    "neat_packing": LFKey("translate", "packing: true (spbench's packing never lets attention cross samples)",
                          to=_flag("neat_packing", lambda: {"packing": True})),
    "flash_attn": LFKey("translate", "attention_kernel: auto (cudnn/flash on CUDA in bf16, cpu-flash on CPU) for auto, "
                        "fa2, fa3 and sdpa; reference (exact, slow) for disabled",
                        to=_one_of("flash_attn", {"auto": {"attention_kernel": "auto"}, "fa2": {"attention_kernel": "auto"},
                                                  "fa3": {"attention_kernel": "auto"}, "sdpa": {"attention_kernel": "auto"},
                                                  "disabled": {"attention_kernel": "reference"}})),
    "disable_gradient_checkpointing": LFKey("translate", "gradient_checkpointing: not the value",
                                            to=_flag("disable_gradient_checkpointing",
                                                     lambda: {"gradient_checkpointing": False},
                                                     {"gradient_checkpointing": True})),
    # refused: they would change the training
    "pref_ftx": LFKey("refuse", "the SFT term of the DPO loss is not implemented", harmless=(0, 0.0)),
    "dpo_label_smoothing": LFKey("refuse", "label-smoothed (robust) DPO is not implemented", harmless=(0, 0.0)),
    "pref_bco_weight": LFKey("refuse", "the BCO term is not implemented", harmless=(0, 0.0)),
    "ref_model": LFKey("refuse", "the reference is always the policy's initial weights (a separate ref_model is not implemented)",
                       harmless=(None,)),
    "rope_scaling": LFKey("refuse", "RoPE scaling would change the model; set it in the checkpoint's config.json", harmless=(None,)),
    "quantization_bit": LFKey("refuse", "quantized training is not implemented", harmless=(None,)),
    "use_unsloth": LFKey("refuse", "unsloth replaces the model's kernels; spbench runs its own", harmless=(False,)),
    "train_on_prompt": LFKey("refuse", "prompts are never supervised", harmless=(False,)),
    "mask_history": LFKey("refuse", "every assistant turn is supervised (masking history is not implemented)", harmless=(False,)),
    "streaming": LFKey("refuse", "datasets are read whole", harmless=(False,)),
    "mix_strategy": LFKey("refuse", "datasets are concatenated in the order given", harmless=("concat",)),
    "tokenized_path": LFKey("refuse", "pre-tokenized datasets are not read; give the dataset itself", harmless=(None,)),
    "neftune_noise_alpha": LFKey("refuse", "NEFTune noise is not implemented", harmless=(None, 0, 0.0)),
    "optim": LFKey("refuse", "the optimizer is torch AdamW", harmless=("adamw_torch", "adamw_torch_fused")),
    "adapter_name_or_path": LFKey("refuse", "loading adapters is not implemented", harmless=(None,)),
}
for _name in ("use_galore", "use_badam", "use_apollo", "use_adam_mini", "use_muon", "use_llama_pro", "use_dora",
              "pissa_init", "shift_attn", "upcast_layernorm", "use_swanlab"):
    LF_KEYS[_name] = LFKey("refuse", f"{_name} is not implemented", harmless=(False,))

# spbench keys that only a LLaMA-Factory config sets (with those of LF_KEYS they mark one)
LF_ONLY = ("finetuning_type", "template")

# values of spbench's own keys that LLaMA-Factory spells differently: key → {LF value: (spbench value, note)}
LF_VALUES: dict[str, dict[Any, tuple[Any, str]]] = {
    "sequence_parallel_mode": {"zigzag-ring": ("zigzag", ""), "llama3": ("allgather", "")},
    "lr_scheduler_type": {"constant_with_warmup": ("constant", "")},
    "pref_loss": {"orpo": (None, "orpo is not implemented; use sigmoid, ipo, simpo or hinge"),
                  "kto_pair": (None, "kto_pair is not implemented; use sigmoid, ipo, simpo or hinge")},
}

# spbench keys LLaMA-Factory has too, where the meaning differs in some way (the README table says how)
LF_SHARED = {
    "finetuning_type": "full or lora (peft); freeze is refused",
    "dataset": "comma-separated names looked up in dataset_dir/dataset_info.json, or file paths; a YAML list works too",
    "template": "renders with the checkpoint tokenizer's own chat template (LLaMA-Factory's template code is not reimplemented)",
    "cutoff_len": "truncates the tail of the whole conversation (LLaMA-Factory splits it between prompt and response)",
    "packing": "never lets attention cross samples (LLaMA-Factory's neat_packing); LF's plain packing does",
    "sequence_parallel_mode": "zigzag-ring → zigzag, llama3 → allgather; ulysses as is",
    "lr_scheduler_type": "constant_with_warmup → constant (ours warms up too); linear, cosine as is; others refused",
    "pref_loss": "orpo and kto_pair are refused",
    "warmup_ratio": "as LF: warmup_steps = ⌈ratio × total steps⌉ when warmup_steps is 0",
    "val_size": "as LF (a fraction or a count), but which records are held out follows spbench's seeded permutation",
    "eval_strategy": "no, steps or epoch; eval_loss is Σ token losses / Σ tokens of the whole eval set (HF averages batch means)",
    "save_steps": "as LF; checkpoints hold the HF model plus a layout-free resumable state, written atomically",
    "resume_from_checkpoint": "a checkpoint-N folder or true (the latest complete one); DeepSpeed runs on their own layout",
    "ddp_timeout": "as LF: seconds before a collective gives up",
    "deepspeed": "its \"auto\" values are filled in; its optimizer and scheduler blocks are replaced by the trainer's",
}

# LLaMA-Factory's (and HF TrainingArguments') defaults where spbench's differ, for keys an LF config leaves out
LF_DEFAULTS = {"num_train_epochs": 3.0, "lr_scheduler_type": "linear", "learning_rate": 5e-5,
               "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "seed": 42, "cutoff_len": 2048, "dtype": "float32"}


def translate(values: dict[str, Any], own: set[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """spbench keys for `values` (a config that may use LLaMA-Factory keys) and one note per difference worth saying.

    `own`: spbench's key names. Raises LFKeyError naming every unknown and refused key at once."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    problems: list[str] = []
    unknown = sorted(k for k in values if k not in own and k not in LF_KEYS)
    if unknown:
        problems.append(f"unknown keys {', '.join(unknown)} (neither spbench nor LLaMA-Factory keys spbench knows; "
                        f"the README lists both)")
    from_lf = any(k in LF_KEYS or k in LF_ONLY for k in values)
    for key, value in values.items():
        if key in own:
            value, why = _own_value(key, value)
            if why:
                problems.append(f"{key}: {why}")
            out[key] = value
        elif key in LF_KEYS:
            problems += _lf_key(key, value, out, notes)
    if problems:
        raise LFKeyError(f"{source}: " + "; ".join(problems))
    if from_lf:
        _lf_defaults(values, out, notes)
    return out, notes


def _own_value(key: str, value: Any) -> tuple[Any, str]:
    if key == "dataset" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return ",".join(value), ""  # LLaMA-Factory takes "a,b"; a YAML list means the same
    spelled = LF_VALUES.get(key, {})
    if isinstance(value, str) and value in spelled:
        new, why = spelled[value]
        return new, why
    return value, ""


def _lf_key(key: str, value: Any, out: dict, notes: list[str]) -> list[str]:
    spec = LF_KEYS[key]
    if spec.action == "refuse":
        if any(value == h and type(value) is type(h) for h in spec.harmless):
            return []
        return [f"{key}: {value!r} is refused: {spec.note}"]
    if spec.action == "translate":
        try:
            new = spec.to(value)
        except ValueError as e:
            return [str(e)]
        out.update({k: v for k, v in new.items() if k not in out})
        if key == "bf16" and value:
            notes.append(f"bf16: true → {_BF16}")
    return []


def _lf_defaults(values: dict, out: dict, notes: list[str]) -> None:
    if "dtype" not in out and (values.get("bf16") or values.get("pure_bf16")):
        out["dtype"] = "bfloat16"
    applied = {k: v for k, v in LF_DEFAULTS.items() if k not in out}
    out.update(applied)
    if applied:
        notes.append("LLaMA-Factory config: its defaults apply to the keys it leaves out: "
                     + ", ".join(f"{k} {v}" for k, v in applied.items()))
    if values.get("packing") and not values.get("neat_packing"):
        notes.append("packing: true packs without cross-sample attention (LLaMA-Factory's neat_packing); "
                     "LLaMA-Factory's plain packing lets attention cross samples, so its losses differ")


def key_table() -> list[tuple[str, str, str]]:
    """(key, what spbench does, note) for every LLaMA-Factory key of the table: the README's section."""
    word = {IGNORED: "accepted, no effect", "translate": "translated", "refuse": "refused"}
    rows = [(key, "spbench key", note) for key, note in LF_SHARED.items()]
    for key, spec in LF_KEYS.items():
        what = word[spec.action]
        if spec.action == "refuse" and spec.harmless:
            what += " unless " + " / ".join("null" if h is None else str(h).lower() if isinstance(h, bool) else str(h)
                                            for h in spec.harmless)
        rows.append((key, what, spec.note))
    return rows
