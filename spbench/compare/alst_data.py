"""The harness's micro-batches as DeepSpeed ALST's data-loader adapter takes them (compare/alst_engine.py): HF-style
batches with unshifted labels, and which of a DP replica's stream each SP rank's loader holds."""
from __future__ import annotations

import torch

from runtime.data import MicroBatch
from runtime.losses import IGNORE


def hf_batch(mb: MicroBatch, length: int) -> dict[str, torch.Tensor]:
    """The micro-batch as an HF collator hands it to ALST: input_ids, position_ids, labels, each [rows, length].

    labels are unshifted: labels[t] = targets[t − 1] and labels[0] = −100, so ALST's shift (shift_labels[t] =
    labels[t + 1]) gives back the harness's targets; a document's first token is −100, as HF's packing collator
    writes it. Padding: input 0, label −100, positions continuing the row (causal attention never lets a real token
    see them). E.g. targets [[7, 8, 2, −]] → labels [[−, 7, 8, 2]]."""
    rows, n = mb.input_ids.shape[0], length
    if n < mb.seq_len or (mb.targets[:, -1] != IGNORE).any():
        raise ValueError(f"cannot pad a micro-batch of {mb.seq_len} tokens to {n} (or its last target is supervised)")
    pad = n - mb.seq_len
    targets = torch.nn.functional.pad(mb.targets, (0, pad), value=IGNORE)  # [rows, n]
    labels = torch.cat([torch.full((rows, 1), IGNORE), targets[:, :-1]], dim=1)  # [rows, n]
    arange = torch.arange(n).expand(rows, n)
    positions = torch.where(arange < mb.seq_len, torch.nn.functional.pad(mb.position_ids, (0, pad)), arange)
    return {"input_ids": torch.nn.functional.pad(mb.input_ids, (0, pad)), "position_ids": positions, "labels": labels}


def rank_batches(stream: list, sp: int, sp_rank: int, top_up: bool = True) -> list:
    """This SP rank's loader items: stream[sp_rank], stream[sp_rank + sp], ... with the stream topped up by
    repetition to a multiple of sp, so every rank's loader has as many (e.g. 3 items, sp 2 → [s0, s2], [s1, s0]);
    `top_up=False`: as they come (3 items, sp 2 → [s0, s2], [s1])."""
    full = stream + ([stream[i % len(stream)] for i in range(-len(stream) % sp)] if top_up else [])
    return full[sp_rank::sp]
