"""Where training records come from: tokenizers (bytes, or a checkpoint's own), synthetic records, dataset files.

A record is a dict of token-id lists: {"turns": [[prompt, response], …]} or its one-turn form {"prompt", "response"}
(SFT), {"prompt", "chosen", "rejected"} (DPO);
runtime.data turns records into units, micro-batches and shards.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig
from .data import DataError, EvalSchedule, StepSchedule, build_units
from .formats import load_conversations
from .render import choose_format


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 = pad, 1 = bos, 2 = eos): presets have no tokenizer files."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


class CheckpointTokenizer:
    """A local checkpoint's own tokenizer behind the ByteTokenizer interface (encode, pad_id, eos_id)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.eos_id is None:
            raise DataError("the checkpoint's tokenizer has no eos token; set eos_token in tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a local checkpoint dir when it ships one, else ByteTokenizer (presets, bare weights)."""
    path = Path(name_or_path)
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return CheckpointTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    return ByteTokenizer()


SYNTHETIC = ("synthetic", "synthetic-full")


def synthetic_records(stage: str, n: int, cutoff: int, vocab: int, seed: int, full: bool = False) -> list[dict]:
    """Random token records; prompts up to 3/4 of cutoff so early SP shards often hold no labels (F2, F5).

    `full`: every sequence is exactly `cutoff` tokens (a quarter prompt), as memory and speed probes need."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        n_tok = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=g))
        return torch.randint(3, vocab, (n_tok,), generator=g).tolist()

    out = []
    for _ in range(n):
        if full:
            rest = cutoff - cutoff // 4  # the eos _example appends is cut: every row holds cutoff tokens
            out.append({"prompt": tokens(cutoff // 4, cutoff // 4),
                        **({"response": tokens(rest, rest)} if stage == "sft" else
                           {"chosen": tokens(rest, rest), "rejected": tokens(rest, rest)})})
            continue
        prompt = tokens(1, max(1, 3 * cutoff // 4))
        if stage == "sft":
            out.append({"prompt": prompt, "response": tokens(1, max(1, cutoff // 2))})
        else:
            out.append({"prompt": prompt, "chosen": tokens(1, cutoff // 3), "rejected": tokens(1, cutoff // 3)})
    return out


def read_records(cfg: TrainConfig, tok, dataset: str | None = None) -> list[dict]:
    """Token records of `dataset` (default: the config's; runtime/formats.py reads, runtime/render.py renders)."""
    fmt = choose_format(cfg.template, tok)
    convs = load_conversations(dataset or cfg.dataset, cfg.dataset_dir, cfg.stage)[: cfg.max_samples]
    return [fmt.pair(c) if cfg.stage == "dpo" else fmt.sft(c) for c in convs]


def record_ids(rec: dict) -> list[int]:
    """Every token id of a record (SFT turns or DPO prompt/chosen/rejected)."""
    if "turns" in rec:
        return [t for p, r in rec["turns"] for t in p + r]
    return [t for v in rec.values() for t in v]


def _records(cfg: TrainConfig, tokenizer, vocab: int, dataset: str) -> list[dict]:
    if dataset in SYNTHETIC:
        records = synthetic_records(cfg.stage, cfg.max_samples or 64, cfg.cutoff_len, vocab, cfg.seed,
                                    full=dataset == "synthetic-full")
    else:
        records = read_records(cfg, tokenizer, dataset)
        if not records:
            raise DataError(f"dataset {dataset} has no records; give one with at least one example")
    if max((max(record_ids(r), default=0) for r in records), default=0) >= vocab:
        raise ConfigError(f"dataset token ids exceed the model's vocabulary ({vocab})")
    return records


def split_records(records: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): val_size < 1 is a fraction (⌈val_size × n⌉ records, as LLaMA-Factory's split), ≥ 1 a count;
    which records are held out depends on the seed alone; both keep the records' order."""
    n_eval = math.ceil(val_size * len(records)) if val_size < 1 else int(val_size)
    if not 0 <= n_eval < len(records):
        raise ConfigError(f"val_size {val_size:g} holds out {n_eval} of the {len(records)} records; leave some to train on")
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _units(cfg: TrainConfig, records: list[dict], eos: int, what: str) -> list:
    units = build_units(cfg.stage, records, cfg.cutoff_len, cfg.packing, eos)
    if not any(u.supervised() for u in units):  # every response cut away: the run would train on nothing
        raise DataError(f"no record of the {what} keeps a supervised token within cutoff_len "
                        f"{cfg.cutoff_len} (the prompts fill it); raise cutoff_len or shorten the prompts")
    return units


def build_schedule(cfg: TrainConfig, dp: int, tokenizer, vocab: int) -> StepSchedule:
    """The run's data: records (synthetic or read; less those val_size holds out), cut into units, scheduled over
    steps and `dp` replicas.

    Pure Python and CPU tensors, built before the model: a fake-tensor trace builds it outside the trace."""
    records = _records(cfg, tokenizer, vocab, cfg.dataset)
    if cfg.val_size:
        records, _ = split_records(records, cfg.val_size, cfg.seed)
    units = _units(cfg, records, tokenizer.eos_id, f"dataset {cfg.dataset!r}")
    sched = StepSchedule(units, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, dp, cfg.seed)
    if sched.global_batch > len(units):
        raise ConfigError(f"global batch {sched.global_batch} (batch × grad accum × dp) exceeds the {len(units)} rows "
                          f"of the dataset; lower per_device_train_batch_size or gradient_accumulation_steps")
    return sched


def build_eval_schedule(cfg: TrainConfig, dp: int, tokenizer, vocab: int) -> EvalSchedule | None:
    """The evaluation data (eval_dataset, or what val_size holds out of the dataset), or None without evaluation."""
    if cfg.eval_strategy == "no":
        return None
    if cfg.eval_dataset:
        records = _records(cfg, tokenizer, vocab, cfg.eval_dataset)
    else:
        _, records = split_records(_records(cfg, tokenizer, vocab, cfg.dataset), cfg.val_size, cfg.seed)
    units = _units(cfg, records, tokenizer.eos_id, "evaluation data")
    return EvalSchedule(units, cfg.per_device_eval_batch_size, dp)
