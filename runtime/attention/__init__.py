"""Topology-aware SP attention: local kernels, block attention with the stable LSE merge, one file per
strategy (ulysses, ring/zigzag, hybrid, allgather), the dispatch from a method name, and the registration
with transformers' AttentionInterface (hf.py)."""
from .dispatch import METHODS, SPAttention, resolve_ulysses, shard_plan

__all__ = ["METHODS", "SPAttention", "resolve_ulysses", "shard_plan"]
