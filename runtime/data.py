"""SFT/DPO records → tokens → rows (packed or not) → optimizer steps → micro-batches → SP shards.

Order of operations (FAULTS.md F1, F7, F8): labels are shifted per document on the whole
sequence (the last token of a document never predicts the next document), then rows are
padded (padding is never supervised, document id −1), then the SP layout splits them.

Data order is a function of the seed and the *global* batch only: the rows of the run
are permuted once per epoch from the seed, optimizer step k takes rows [kG, (k+1)G) with
G = per_device_batch × grad_accum × dp, and row j of a step goes to dp rank
j // (grad_accum·batch), micro-batch (j // batch) % grad_accum. Runs with different
(SP, DP, GA) at the same G therefore see the same rows in every step.

Worked example (unpacked SFT, one row): prompt [5, 6], response [7, 8], eos 2 →
input [5, 6, 7, 8, 2], labels [−, −, 7, 8, 2] → targets [−, 7, 8, 2, −].
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .attention.blockattn import SeqMeta
from .errors import InputError
from .layout import ShardPlan, document_position_ids, pad_to
from .losses import IGNORE


class DataError(InputError):
    """Unusable data: the message names the file, line and field."""


@dataclass
class Doc:
    """One tokenised sequence: labels are IGNORE where not supervised (not yet shifted)."""

    input_ids: list[int]
    labels: list[int]
    pair: int = -1  # dpo: index of the pair this sequence belongs to
    chosen: bool = True

    def targets(self) -> list[int]:
        """Labels shifted left by one inside this document; the last token predicts nothing."""
        return self.labels[1:] + [IGNORE]


@dataclass
class Unit:
    """What one slot of the global batch holds: one row, or (unpacked DPO) a chosen+rejected pair of rows."""

    docs: list[Doc]
    split: bool = False  # True: every doc gets its own tensor row (unpacked DPO pairs)

    def supervised(self) -> int:
        return sum(t != IGNORE for d in self.docs for t in d.targets())

    def pairs(self) -> set[int]:
        return {d.pair for d in self.docs if d.pair >= 0}


def _example(turns: list, cutoff: int, eos: int, **kw) -> Doc:
    """[(prompt, response), …] → one document: each response and its eos supervised, cut to `cutoff` at the tail."""
    ids, labels = [], []
    for prompt, response in turns:
        ids += prompt + response + [eos]
        labels += [IGNORE] * len(prompt) + response + [eos]
    return Doc(ids[:cutoff], labels[:cutoff], **kw)


def _turns(record: dict) -> list:
    return record["turns"] if "turns" in record else [(record["prompt"], record["response"])]


def build_units(stage: str, records: list[dict], cutoff: int, packing: bool, eos: int) -> list[Unit]:
    """Records → global-batch units. Packing is greedy in record order; a dpo pack keeps pairs whole."""
    if not records:
        raise DataError("the dataset is empty; give a .jsonl with at least one record")
    if stage == "sft":
        docs = [[_example(_turns(r), cutoff, eos)] for r in records]
        capacity = cutoff
    else:
        docs = [[_example([(r["prompt"], r["chosen"])], cutoff, eos, pair=i, chosen=True),
                 _example([(r["prompt"], r["rejected"])], cutoff, eos, pair=i, chosen=False)] for i, r in enumerate(records)]
        capacity = 2 * cutoff  # a pair always fits a packed dpo row
    if not packing:
        return [Unit(d, split=stage == "dpo") for d in docs]
    units, current, used = [], [], 0
    for group in docs:
        n = sum(len(d.input_ids) for d in group)
        if current and used + n > capacity:
            units.append(Unit(current))
            current, used = [], 0
        current, used = current + group, used + n
    units.append(Unit(current))
    return units


def longest_row(units: list[Unit]) -> int:
    """Tokens of the longest tensor row the units make (a split unit makes one row per document); 0 if none."""
    return max((max(len(d.input_ids) for d in u.docs) if u.split else sum(len(d.input_ids) for d in u.docs)
                for u in units), default=0)


@dataclass
class MicroBatch:
    """Full (unsharded) tensors of one micro-batch, identical on every rank of an SP group.

    input_ids, targets, position_ids, doc_ids, seq_slot : [rows, length]
      doc_ids  : document index within the row, −1 on padding
      seq_slot : dpo sequence slot per token (−1: padding), so per-sequence sums can be scattered
    pairs    : dpo (chosen slot, rejected slot) per pair in this micro-batch
    num_slots: sequence slots in use (seq_slot.max() + 1), known without reading a tensor back
    packed   : rows hold several documents (attention needs document masks)
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    seq_slot: torch.Tensor
    pairs: list[tuple[int, int]] = field(default_factory=list)
    num_slots: int = 1
    packed: bool = False

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def collate(units: list[Unit], pad_id: int) -> MicroBatch:
    """Units → padded tensors (right padding: input pad_id, target IGNORE, doc −1)."""
    rows: list[list[Doc]] = []
    for u in units:
        rows += [[d] for d in u.docs] if u.split else [u.docs]
    slot_of: dict[tuple[int, bool], int] = {}
    ids, tgts, docs, slots = [], [], [], []
    for row in rows:
        r_ids, r_tgt, r_doc, r_slot = [], [], [], []
        for j, d in enumerate(row):
            slot = slot_of.setdefault((d.pair, d.chosen), len(slot_of)) if d.pair >= 0 else 0
            r_ids += d.input_ids
            r_tgt += d.targets()
            r_doc += [j] * len(d.input_ids)
            r_slot += [slot] * len(d.input_ids)
        ids.append(torch.tensor(r_ids))
        tgts.append(torch.tensor(r_tgt))
        docs.append(torch.tensor(r_doc))
        slots.append(torch.tensor(r_slot))
    n = max(len(x) for x in ids)
    stack = lambda xs, v: torch.stack([pad_to(x, n, 0, v) for x in xs])  # noqa: E731
    doc_ids = stack(docs, -1)
    pairs = sorted({(slot_of[(p, True)], slot_of[(p, False)]) for (p, _c) in slot_of})
    return MicroBatch(
        input_ids=stack(ids, pad_id),
        targets=stack(tgts, IGNORE),
        position_ids=document_position_ids(doc_ids),
        doc_ids=doc_ids,
        seq_slot=stack(slots, -1),
        pairs=pairs,
        num_slots=max(1, len(slot_of)),
        packed=any(len(r) > 1 for r in rows),
    )


@functools.lru_cache(maxsize=8)
def epoch_order(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    """The row order of one epoch: a permutation of range(n) from (seed, epoch) alone (pure, memoised)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist())


@dataclass
class StepSchedule:
    """Which units each optimizer step uses and how they split over (dp, micro-batch)."""

    units: list[Unit]
    per_device: int
    grad_accum: int
    dp: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.grad_accum * self.dp

    def steps(self, max_steps: int | None, epochs: float) -> int:
        """max_steps, or floor(epochs · units / global batch) (at least 1)."""
        if max_steps is not None:
            return max_steps
        return max(1, math.floor(epochs * len(self.units) / self.global_batch))

    def step_units(self, step: int) -> list[Unit]:
        """The global batch of optimizer step `step` (epoch permutations from the seed, concatenated)."""
        n, g = len(self.units), self.global_batch
        return [self.units[epoch_order(self.seed, n, j // n)[j % n]] for j in range(step * g, (step + 1) * g)]

    def micro_batches(self, step: int, dp_rank: int, pad_id: int) -> list[MicroBatch]:
        """This dp rank's grad_accum micro-batches of step `step`."""
        units = self.step_units(step)
        mine = units[dp_rank * self.grad_accum * self.per_device : (dp_rank + 1) * self.grad_accum * self.per_device]
        return [collate(mine[m * self.per_device : (m + 1) * self.per_device], pad_id) for m in range(self.grad_accum)]

    def step_tokens(self, step: int) -> int:
        """Supervised tokens of the whole step (all ranks, all micro-batches)."""
        return sum(u.supervised() for u in self.step_units(step))

    def step_denominator(self, step: int, stage: str) -> int:
        """sft: supervised tokens of the whole step; dpo: pairs in the step."""
        if stage == "sft":
            return self.step_tokens(step)
        return len(set().union(*(u.pairs() for u in self.step_units(step))))


@dataclass
class EvalSchedule:
    """The held-out units, in order, `per_device` rows per micro-batch per dp replica (no shuffling, no
    accumulation). The last round may leave some replicas without a unit: they run a copy of unit 0 with
    weight 0, so every rank joins the same collectives (ZeRO-3 gathers parameters over all ranks)."""

    units: list[Unit]
    per_device: int
    dp: int

    def rounds(self) -> int:
        return math.ceil(len(self.units) / (self.per_device * self.dp))

    def micro_batches(self, dp_rank: int, pad_id: int) -> list[tuple[MicroBatch, float]]:
        """(micro-batch, weight 1 or 0) of this replica for every round."""
        out = []
        for r in range(self.rounds()):
            start = (r * self.dp + dp_rank) * self.per_device
            mine = self.units[start : start + self.per_device]
            out.append((collate(mine, pad_id), 1.0) if mine else (collate(self.units[:1], pad_id), 0.0))
        return out

    def denominator(self, stage: str) -> int:
        """sft: supervised tokens of the whole eval set; dpo: its pairs."""
        if stage == "sft":
            return sum(u.supervised() for u in self.units)
        return len(set().union(*(u.pairs() for u in self.units)))


@dataclass
class LocalBatch:
    """One rank's shard of a micro-batch: [rows, local_len] tensors plus the layout facts."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    seq_slot: torch.Tensor
    meta: SeqMeta


def shard_batch(mb: MicroBatch, plan_for, sp_rank: int, device: torch.device | str = "cpu") -> LocalBatch:
    """Pad `mb` to the layout's length and take `sp_rank`'s shard.

    `plan_for(seq_len) -> ShardPlan` gives the layout of the SP method in use. Padding
    tokens are unsupervised (IGNORE), belong to no sequence (slot −1), and get positions
    that continue the row, which matters to nobody: causal attention never lets a real
    token see them, and packed rows mask them as document −1.
    """
    plan: ShardPlan = plan_for(mb.seq_len)
    n = plan.total_len
    full_pos = torch.arange(n).expand(mb.input_ids.shape[0], n)
    position_ids = torch.where(torch.arange(n) < mb.seq_len, pad_to(mb.position_ids, n, 1, 0), full_pos)
    meta = SeqMeta.build(plan, mb.seq_len, causal=True, doc_ids=mb.doc_ids.to(device) if mb.packed else None)

    def take(x: torch.Tensor, value: int) -> torch.Tensor:
        return plan.shard(pad_to(x, n, 1, value), sp_rank).to(device)

    return LocalBatch(
        input_ids=take(mb.input_ids, 0),
        targets=take(mb.targets, IGNORE),
        position_ids=plan.shard(position_ids, sp_rank).to(device),
        seq_slot=take(mb.seq_slot, -1),
        meta=meta,
    )
