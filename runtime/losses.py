"""Token log-probabilities (tiled or not), the SFT token loss, and the DPO family.

Normalisation rules (DESIGN.md, FAULTS.md F2/F4/F5/F10):
* SFT: each rank returns Σ(its token losses) / N, with N the supervised-token count of
  the whole optimizer step (all SP shards × grad-accum micro-batches × DP replicas),
  known to every rank from the data. A shard with no supervised tokens returns exactly
  0. Gradients are then *summed* over every rank (SP and DP): that sum is the gradient
  of the global mean.
* DPO: per-sequence log-prob sums and supervised lengths are partial per shard; they are
  summed over the SP group with `comm.sum_shards` (backward: identity) before the loss,
  and each pair's loss is divided by the number of pairs in the optimizer step. Every
  SP rank computes the same pair losses; the SP gradient sum assembles the full gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
PREF_LOSSES = ("sigmoid", "ipo", "simpo", "hinge")


def _logprobs_of(hidden: torch.Tensor, lm_head, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per token for one chunk; 0 where target == IGNORE. Logits in ≥ float32."""
    logits = lm_head(hidden)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    safe = targets.clamp_min(0)
    logp = torch.gather(F.log_softmax(logits, dim=-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(targets == IGNORE, torch.zeros_like(logp), logp)


def token_logprobs(hidden: torch.Tensor, lm_head, targets: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(targets[i] | ...) for every token of `hidden` [..., h]; targets [...] (IGNORE → 0).

    With `chunk_tokens`, tokens go through `lm_head` in chunks under activation
    checkpointing: only one chunk's full-vocabulary logits exist at a time, in forward
    and in backward (FAULTS.md F11). `lm_head` is called as a module, so ZeRO-3 gathers
    its weight each time. The result equals the untiled one to rounding.
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if chunk_tokens is None or h.shape[0] <= chunk_tokens:
        return _logprobs_of(h, lm_head, t).reshape(shape)
    parts = [
        checkpoint(_logprobs_of, h[i : i + chunk_tokens], lm_head, t[i : i + chunk_tokens], use_reentrant=False)
        for i in range(0, h.shape[0], chunk_tokens)
    ]
    return torch.cat(parts).reshape(shape)


def sft_loss(logp: torch.Tensor, targets: torch.Tensor, step_tokens: int) -> torch.Tensor:
    """This shard's share of the step's mean token loss: −Σ logp / step_tokens (0 if no tokens)."""
    return -(logp.sum()) / max(int(step_tokens), 1)


def sequence_sums(logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row partial (log-prob sum, supervised length) of this shard: [b], [b]."""
    return logp.sum(-1), (targets != IGNORE).sum(-1).to(logp.dtype)


@dataclass
class PrefOut:
    """Per-pair DPO quantities: losses [B], rewards of chosen/rejected [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(kind: str, pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta: float, gamma: float = 0.0) -> PrefOut:
    """The DPO family from *global* per-sequence log-prob sums and lengths ([B] each).

    sigmoid (DPO):  −log σ(β[(π_c − ρ_c) − (π_r − ρ_r)])
    hinge:          relu(1 − β[(π_c − ρ_c) − (π_r − ρ_r)])
    ipo:            ((π̄_c − ρ̄_c) − (π̄_r − ρ̄_r) − 1/(2β))²,  x̄ = x / length (global length, F10)
    simpo:          −log σ(β(π̄_c − π̄_r) − γ)   (reference-free)
    Rewards: β(π − ρ) for sigmoid/hinge, β(π̄ − ρ̄) for ipo, β·π̄ for simpo.
    """
    if kind in ("sigmoid", "hinge"):
        rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
        losses = -F.logsigmoid(rc - rr) if kind == "sigmoid" else torch.relu(1 - (rc - rr))
        return PrefOut(losses, rc, rr)
    lc, lr = len_c.clamp_min(1), len_r.clamp_min(1)
    if kind == "ipo":
        rc, rr = (pi_c - ref_c) / lc, (pi_r - ref_r) / lr
        return PrefOut((rc - rr - 1 / (2 * beta)) ** 2, beta * rc, beta * rr)
    if kind == "simpo":
        rc, rr = beta * pi_c / lc, beta * pi_r / lr
        return PrefOut(-F.logsigmoid(rc - rr - gamma), rc, rr)
    raise ValueError(f"unknown pref_loss {kind!r}; choose from {', '.join(PREF_LOSSES)}")
