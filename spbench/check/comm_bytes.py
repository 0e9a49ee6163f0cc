"""What each SP strategy must send, at the minimum, against what the runtime's byte counter measures.

Per rank, per decoder layer, per local token (a rank holding t tokens of a micro-batch row sends t × these), with
H query heads, KV kv heads (replicated to KVr = max(KV, u) for a Ulysses degree u), head dim d, e bytes per element
(a = bytes of the ring's dK/dV accumulators: float64 stays float64, else float32):

  ulysses (u = P)   forward  (2H + 2KVr)·d·e·(u−1)/u   q, k, v to heads, out back    backward: the same, for dO, dQ, dK, dV
  ring / zigzag     forward  2(P−1)·KV·d·e            K and V pass P−1 hops         backward: K/V again + dK/dV 2(P−1)·KV·d·a
  allgather         forward  2(P−1)·KV·d·e            K and V gathered              backward: dK/dV reduce-scattered 2(P−1)·KV·d·e
  hybrid (u × r)    ulysses at degree u, plus ring at degree r over ring blocks of KVr·d elements per local token

Excess the runtime adds, explained rather than counted as minimum:
  * the ring's dK/dV accumulators make P hops, not P−1 (each starts at its block's owner and one last hop brings it
    home: 2·KV·d·a per token, the price of keeping the backward's data flow that of the forward);
  * gradient checkpointing recomputes each layer's forward in backward, attention collectives included (one more
    forward's bytes).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    """Per-layer attention shape and element sizes of a run."""

    heads: int
    kv_heads: int
    head_dim: int
    elem_bytes: int  # q/k/v/out dtype
    acc_bytes: int  # ring dK/dV accumulators: 8 for float64, else 4


def _ulysses(s: AttentionShape, u: int) -> float:
    kvr = max(s.kv_heads, u)
    return (2 * s.heads + 2 * kvr) * s.head_dim * s.elem_bytes * (u - 1) / u


def per_token(method: str, sp: int, ulysses: int, s: AttentionShape) -> dict[str, float]:
    """{"forward", "backward" (minimum), "excess" (the ring's final hop)} bytes per local token per layer."""
    d, e, a = s.head_dim, s.elem_bytes, s.acc_bytes
    if method == "ulysses":
        f = _ulysses(s, sp)
        return {"forward": f, "backward": f, "excess": 0.0}
    if method in ("ring", "zigzag"):
        kv = 2 * s.kv_heads * d
        return {"forward": (sp - 1) * kv * e, "backward": (sp - 1) * kv * (e + a), "excess": kv * a if sp > 1 else 0.0}
    if method == "allgather":
        kv = 2 * s.kv_heads * d * e
        return {"forward": (sp - 1) * kv, "backward": (sp - 1) * kv, "excess": 0.0}
    if method == "hybrid":
        u, r = ulysses, sp // ulysses
        kv = 2 * max(s.kv_heads, u) * d  # a ring block: u× the tokens, 1/u of the replicated kv heads
        uly = _ulysses(s, u) if u > 1 else 0.0
        return {"forward": uly + (r - 1) * kv * e, "backward": uly + (r - 1) * kv * (e + a),
                "excess": kv * a if r > 1 else 0.0}
    raise ValueError(f"unknown SP method {method!r}")


def step_bytes(method: str, sp: int, ulysses: int, s: AttentionShape, tokens: int, layers: int,
               recompute: bool) -> dict[str, float]:
    """Minimum and explained bytes of one step for a rank that held `tokens` tokens (all micro-batches):
    {"minimum": forward + backward, "excess": ring hop + recompute, "expected": their sum}."""
    t = per_token(method, sp, ulysses, s)
    minimum = (t["forward"] + t["backward"]) * tokens * layers
    excess = (t["excess"] + (t["forward"] if recompute else 0.0)) * tokens * layers
    return {"minimum": minimum, "excess": excess, "expected": minimum + excess}
