"""The adapters `spbench compare` can run, by name (more come as adapters land: HF accelerate, ms-swift, verl)."""
from __future__ import annotations

from .adapters import SPBENCH, Implementation
from .alst import DEEPSPEED_ALST
from .swift import MS_SWIFT
from .verl import VERL, VERL_SDPA


def implementations() -> dict[str, Implementation]:
    return {impl.name: impl for impl in (SPBENCH, DEEPSPEED_ALST, MS_SWIFT, VERL, VERL_SDPA)}
