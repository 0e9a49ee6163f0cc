"""Each implementation's max trainable length on 8 × 80 GB, ESTIMATED by the memory model from its own feature set.

The features per implementation are data (compare/memory.toml, a reason per choice); this module turns one entry
into a `spbench.memory.setup.Setup` (which raises for a configuration the runtime would refuse) and asks the
memory model for the longest length that fits and the peak there. Nothing here is measured.
"""
from __future__ import annotations

from dataclasses import replace
from importlib import resources

import tomllib

GPUS, GPU_MEM_GIB = 8, 80.0


def memory_features() -> dict[str, dict]:
    """compare/memory.toml's entries by implementation name."""
    text = resources.files("spbench.compare").joinpath("memory.toml").read_text(encoding="utf-8")
    return {e["impl"]: e for e in tomllib.loads(text)["estimates"]}


def base_name(impl: str) -> str:
    """The adapter name of an implementation entry: `spbench@swift` (a merged document's later run) → spbench."""
    return impl.split("@", 1)[0]


def setup_of(entry: dict):
    """The memory model's Setup for one memory.toml entry (SFT, 8 GPUs of 80 GB); raises ValueError or the
    runtime's TopologyError for a configuration the runtime would refuse."""
    from runtime.memory import AUTO, DEFAULT_LOSS_CHUNK, DEFAULT_NORM_CHUNK, MemoryFeatures

    from ..memory.setup import Setup

    on = {"tiled_loss": ("tiled_loss_chunk", DEFAULT_LOSS_CHUNK), "tiled_mlp": ("tiled_mlp_chunks", AUTO),
          "tiled_norm": ("tiled_norm_chunk", DEFAULT_NORM_CHUNK), "checkpoint_offload": ("checkpoint_offload", True)}
    # plain transformers (every tiling and offload off, gradient checkpointing on), then what the entry turns on
    feats = replace(MemoryFeatures.plain(), **{field: value for key, (field, value) in on.items() if entry[key]})
    return Setup(entry["model"], "sft", GPUS, GPU_MEM_GIB, entry["sp"], entry["zero"], frozenset(entry["offload"]),
                 feats, entry["strategy"], attention_kernel=entry["attention_kernel"])


def estimate(entry: dict) -> dict:
    """One row: the entry's setup, its estimated max length (a multiple of 1024 tokens) and the peak there."""
    from ..memory.model import maxlen_for, peak_memory

    setup = setup_of(entry)
    max_len = maxlen_for(setup)
    peak = peak_memory(setup, max_len) if max_len else None
    keys = ("model", "strategy", "attention_kernel", "sp", "zero", "offload", "tiled_mlp", "tiled_loss", "tiled_norm", "checkpoint_offload",
            "reason")
    return {**{k: entry[k] for k in keys}, "gpus": GPUS, "gpu_mem_gib": GPU_MEM_GIB, "max_len": max_len,
            "peak_gib": round(peak["total_gib"], 2) if peak else None, "phase": peak["phase"] if peak else None,
            "host_gib": round(peak["host_gib"], 1) if peak else None, "source": "estimated (memory model)"}


def estimates(impls) -> dict[str, dict]:
    """{implementation: estimate row} for the names in `impls` that memory.toml has (by base name)."""
    table = memory_features()
    cache: dict[str, dict] = {}
    out = {}
    for name in impls:
        base = base_name(name)
        if base in table:
            out[name] = cache.setdefault(base, estimate(table[base]))
    return out


def features_cell(row: dict) -> str:
    """The memory features of an estimate row, as one short Markdown cell."""
    on = [name for key, name in (("tiled_mlp", "tiled MLP"), ("tiled_loss", "tiled loss"), ("tiled_norm", "tiled norm"),
                                  ("checkpoint_offload", "ckpt offload")) if row.get(key)]
    offload = "+".join(row.get("offload") or []) or "no"
    return (f"{row['strategy']} SP {row['sp']}, ZeRO-{row['zero']} ({offload} offload), "
            + (", ".join(on) if on else "plain (untiled)"))
