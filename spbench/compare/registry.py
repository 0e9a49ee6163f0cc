"""The adapters `spbench compare` can run, by name (more come as adapters land: HF accelerate, ms-swift, verl)."""
from __future__ import annotations

from .adapters import SPBENCH, Implementation
from .alst import DEEPSPEED_ALST
from .alst_engine import ALST_ENGINE, ALST_ENGINE_DYNAMIC_PAD
from .flash_engines import RING_FLASH_ATTN, YUNCHANG
from .hf_accelerate import HF_ACCELERATE_SP
from .swift import MS_SWIFT
from .verl import VERL, VERL_SDPA


def implementations() -> dict[str, Implementation]:
    return {impl.name: impl for impl in (SPBENCH, DEEPSPEED_ALST, ALST_ENGINE, ALST_ENGINE_DYNAMIC_PAD,
                                              HF_ACCELERATE_SP, RING_FLASH_ATTN, YUNCHANG, MS_SWIFT, VERL, VERL_SDPA)}
