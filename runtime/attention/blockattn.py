"""Attention between two sets of global tokens described by segments, and the stable LSE merge.

Every strategy reduces to this: queries holding segments ``q_segs`` attend to keys holding
``k_segs`` (see layout.py). Each (query segment, key segment) pair is, for a causal model,
either entirely visible (keys before queries), the causal diagonal (same segment), or
invisible (keys after): so fast kernels run with plain ``is_causal`` flags and no O(s²)
mask. Document ids (packing, or padding under a non-causal mask) add a bool mask only
for pairs that actually mix documents, and kernels without masks (CUDA) split such a
pair by document instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import Segments, ShardPlan, pad_to
from .kernels import Kernel


@dataclass(frozen=True)
class SeqMeta:
    """Per-sequence facts every rank shares for one forward.

    plan     : where each global token lives (layout.ShardPlan)
    causal   : causal attention (False: bidirectional)
    doc_ids  : [b, total_len] document id per token, padding = −1, or None for "one
               document, padding trails" (causal attention then never sees padding)
    """

    plan: ShardPlan
    causal: bool
    doc_ids: torch.Tensor | None

    @classmethod
    def build(cls, plan: ShardPlan, seq_len: int, causal: bool, doc_ids: torch.Tensor | None = None) -> "SeqMeta":
        """Meta for `seq_len` real tokens; padding becomes its own document where a mask needs it.

        `doc_ids` ([b, seq_len] ints ≥ 0) marks packed documents.
        """
        if doc_ids is None and not causal and plan.total_len > seq_len:
            doc_ids = torch.zeros(1, seq_len, dtype=torch.long)
        if doc_ids is not None:
            if doc_ids.shape[-1] != seq_len:
                raise ValueError(f"doc_ids cover {doc_ids.shape[-1]} tokens, sequence has {seq_len}")
            doc_ids = pad_to(doc_ids.long(), plan.total_len, dim=1, value=-1)
        return cls(plan, causal, doc_ids)


def pair_kind(meta: SeqMeta, qs: tuple[int, int], ks: tuple[int, int]) -> tuple[bool, bool, bool]:
    """How query segment `qs` sees key segment `ks`: (visible, causal, mixes documents).

    visible False → skip the pair; causal → diagonal block; mixes documents → a document
    mask (`doc_mask`) or a split by document is needed.
    """
    if qs != ks and max(qs[0], ks[0]) < min(qs[1], ks[1]):
        raise ValueError(f"segments {qs} and {ks} partially overlap; layouts never produce that")
    diagonal = qs == ks
    if meta.causal and not diagonal and ks[0] >= qs[1]:
        return False, False, False  # keys entirely after queries
    causal = meta.causal and diagonal
    if meta.doc_ids is None:
        return True, causal, False
    dq, dk = meta.doc_ids[:, qs[0] : qs[1]], meta.doc_ids[:, ks[0] : ks[1]]
    return True, causal, not bool(dq.min() == dq.max() == dk.min() == dk.max())


def doc_mask(meta: SeqMeta, qs: tuple[int, int], ks: tuple[int, int], causal: bool, device=None) -> torch.Tensor:
    """bool [b, sq, sk]: query and key in the same document (and, if causal, key not after query)."""
    dq, dk = meta.doc_ids[:, qs[0] : qs[1]], meta.doc_ids[:, ks[0] : ks[1]]
    mask = dq[:, :, None] == dk[:, None, :]
    if causal:
        mask = mask & torch.ones(mask.shape[1:], dtype=torch.bool, device=mask.device).tril()
    return mask.to(device) if device is not None else mask


def merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor):
    """Combine two partial attentions over disjoint key sets (stable log-sum-exp form).

    lse = logaddexp(lse, blk_lse); out = Σ out_i · exp(lse_i − lse). Rows where both are
    −inf stay (0, −inf). No exp of a raw score is ever taken, so large logits cannot
    overflow (FAULTS.md F9).
    """
    new, w_old, w_blk = _merge_weights(lse, blk_lse)
    return out * w_old[..., None] + blk_out.to(out.dtype) * w_blk[..., None], new


def merge_into(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """`merge` in place: the accumulators `out` (float32/64) and `lse` take the block's share, with no out-sized
    temporary (the functional form holds four float32 copies of out at once: 16·H·d bytes per token at the ring
    forward's peak, traced)."""
    new, w_old, w_blk = _merge_weights(lse, blk_lse)
    out.mul_(w_old[..., None]).addcmul_(blk_out, w_blk[..., None])
    lse.copy_(new)


def _merge_weights(lse: torch.Tensor, blk_lse: torch.Tensor):
    """(merged lse, weight of the old partial, weight of the block's) for `merge`."""
    new = torch.logaddexp(lse, blk_lse)
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, torch.zeros_like(new))
    w_old = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(new))
    w_blk = torch.where(finite, torch.exp(blk_lse - safe), torch.zeros_like(new))
    return new, w_old, w_blk


def _offsets(segs: Segments) -> list[tuple[tuple[int, int], slice]]:
    res, pos = [], 0
    for s, e in segs:
        res.append(((s, e), slice(pos, pos + e - s)))
        pos += e - s
    return res


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of equal document id in a 1-d tensor: [(id, start, end)] with end exclusive."""
    values, counts = torch.unique_consecutive(ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [(v, e - c, e) for v, c, e in zip(values.tolist(), counts.tolist(), ends)]


def _pieces(meta: SeqMeta, qs, ks, qi: slice, ki: slice, kernel: Kernel, device):
    """Kernel calls that make up the pair (qs, ks): [(rows, q slice, k slice, causal, mask)].

    A pair mixing documents is one masked call when the kernel takes masks. Otherwise it is
    split into one mask-free call per (batch row, document) — documents are contiguous runs
    of global positions, so within a pair each one is a full rectangle (keys before
    queries, or bidirectional) or the causal diagonal of the same run. This keeps the fast
    CUDA kernels (which take no mask) exact and O(s) in memory for packed sequences.
    """
    visible, causal, mixed = pair_kind(meta, qs, ks)
    if not visible:
        return []
    if not mixed:
        return [(slice(None), qi, ki, causal, None)]
    if kernel.supports_mask:
        mask = doc_mask(meta, qs, ks, causal, device)
        return [(slice(None), qi, ki, causal, mask)] if mask.any() else []
    pieces, batch = [], meta.doc_ids.shape[0]
    for row in range(batch):
        rows = slice(None) if batch == 1 else slice(row, row + 1)  # one id row may serve the whole batch
        k_runs = _runs(meta.doc_ids[row, ks[0] : ks[1]])
        for doc, qa, qb in _runs(meta.doc_ids[row, qs[0] : qs[1]]):
            for kdoc, ka, kb in k_runs:
                if kdoc != doc or (causal and ka >= qb):
                    continue  # another document, or (diagonal pair) a later run of this one
                same_run = causal and (ka, kb) == (qa, qb)
                pieces.append((rows, slice(qi.start + qa, qi.start + qb),
                               slice(ki.start + ka, ki.start + kb), same_run, None))
    return pieces


def _all_pieces(q_segs: Segments, k_segs: Segments, meta: SeqMeta, kernel: Kernel, device) -> list:
    return [piece for qs, qi in _offsets(q_segs) for ks, ki in _offsets(k_segs)
            for piece in _pieces(meta, qs, ks, qi, ki, kernel, device)]


def _single_call(pieces: list, sq: int, sk: int):
    """The (causal, mask) of the one kernel call covering every query and key, or None."""
    if len(pieces) != 1:
        return None
    rows, qp, kp, causal, mask = pieces[0]
    whole = rows == slice(None) and (qp.start, qp.stop) == (0, sq) and (kp.start, kp.stop) == (0, sk)
    return (causal, mask) if whole else None


def block_forward(q, k, v, q_segs: Segments, k_segs: Segments, meta: SeqMeta, kernel: Kernel, scale: float):
    """(out [b,H,sq,d], lse [b,H,sq]) of queries `q_segs` over keys `k_segs`.

    lse is float32/64; out is too, except when one kernel call covers the block: then it is the kernel's own
    output (q's dtype) — no merge and no float32 copy, which matters at long lengths (SP off, one ring block).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, sq, d = q.shape
    pieces = _all_pieces(q_segs, k_segs, meta, kernel, q.device)
    single = _single_call(pieces, sq, k.shape[2])
    if single is not None:
        o, l = kernel.forward(q, k, v, causal=single[0], mask=single[1], scale=scale)
        return o, l.to(acc)
    out = q.new_zeros((b, h, sq, d), dtype=acc)
    lse = q.new_full((b, h, sq), float("-inf"), dtype=acc)
    _merge_pieces(out, lse, pieces, q, k, v, kernel, scale)
    return out, lse


def block_forward_into(out, lse, q, k, v, q_segs: Segments, k_segs: Segments, meta: SeqMeta, kernel: Kernel,
                       scale: float) -> None:
    """Merge this block's attention into the accumulators `out` (float32/64 [b,H,sq,d]) and `lse`, in place, one
    kernel call at a time (the ring forward's form: no block-sized copy beside the accumulators)."""
    _merge_pieces(out, lse, _all_pieces(q_segs, k_segs, meta, kernel, q.device), q, k, v, kernel, scale)


def _merge_pieces(out, lse, pieces: list, q, k, v, kernel: Kernel, scale: float) -> None:
    for rows, qp, kp, causal, mask in pieces:
        _merge_piece(out[rows, :, qp], lse[rows, :, qp],
                     kernel.forward(q[rows, :, qp], k[rows, :, kp], v[rows, :, kp], causal=causal, mask=mask, scale=scale))


def _merge_piece(out, lse, piece: tuple) -> None:
    # a function of its own so that one call's output is freed before the next call runs
    o, l = piece
    merge_into(out, lse, o, l.to(lse.dtype))


def block_backward(dout, q, k, v, out, lse, q_segs: Segments, k_segs: Segments, meta: SeqMeta, kernel: Kernel, scale: float):
    """(dq, dk, dv) of this block given the *final* out and lse of the queries (float32/64, or the kernel's own
    dtype when one call covers the block, as in block_forward)."""
    pieces = _all_pieces(q_segs, k_segs, meta, kernel, q.device)
    single = _single_call(pieces, q.shape[2], k.shape[2])
    if single is not None:
        return kernel.backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                               lse.contiguous(), causal=single[0], mask=single[1], scale=scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = tuple(torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    _add_pieces(grads, pieces, dout, q, k, v, out, lse, kernel, scale)
    return grads


def block_backward_into(grads: tuple, dout, q, k, v, out, lse, q_segs: Segments, k_segs: Segments, meta: SeqMeta,
                        kernel: Kernel, scale: float) -> None:
    """Add this block's (dq, dk, dv) into `grads` (accumulators shaped like q, k, v), in place.

    The ring's own accumulators take each kernel call's gradients directly: no block-sized float32 copy beside them
    (7B, zigzag SP 8: 5.1·h bytes per token less at the backward's peak, traced)."""
    _add_pieces(grads, _all_pieces(q_segs, k_segs, meta, kernel, q.device), dout, q, k, v, out, lse, kernel, scale)


def _add_pieces(grads: tuple, pieces: list, dout, q, k, v, out, lse, kernel: Kernel, scale: float) -> None:
    for rows, qp, kp, causal, mask in pieces:
        _add_piece(grads, rows, qp, kp, kernel.backward(
            dout[rows, :, qp].contiguous(), q[rows, :, qp].contiguous(), k[rows, :, kp].contiguous(),
            v[rows, :, kp].contiguous(), out[rows, :, qp].contiguous(), lse[rows, :, qp].contiguous(),
            causal=causal, mask=mask, scale=scale,
        ))


def _add_piece(grads: tuple, rows, qp: slice, kp: slice, piece: tuple) -> None:
    # a function of its own so that one piece's gradients are freed before the next piece's kernel runs
    dq, dk, dv = grads
    gq, gk, gv = piece
    dq[rows, :, qp] += gq
    dk[rows, :, kp] += gk
    dv[rows, :, kp] += gv


class LocalAttention(torch.autograd.Function):
    """Autograd wrapper of block_forward/backward for keys that are all present locally."""

    @staticmethod
    def forward(ctx, q, k, v, q_segs, k_segs, meta, kernel, scale):
        out, lse = block_forward(q, k, v, q_segs, k_segs, meta, kernel, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_segs, k_segs, meta, kernel, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = list(block_backward(dout, q, k, v, out, lse, *ctx.args))
        for i, like in enumerate((q, k, v)):  # one cast at a time, each accumulator freed as it is cast: allgather's
            grads[i] = grads[i].to(like.dtype)  # fp32 dK/dV of the whole sequence and all three casts never coexist
        return (*grads, None, None, None, None, None)
