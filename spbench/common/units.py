"""Units used across the harness (one definition each)."""

GiB = 2**30
"""Bytes per GiB: every memory figure spbench prints or stores is in GiB (2**30 B) unless it says MB (10**6 B)."""
MB = 10**6
"""Bytes per MB (decimal), for per-token activation figures."""
