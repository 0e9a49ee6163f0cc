"""DeepSpeed configs the harness writes itself: ZeRO stage and CPU offload are all a run needs to say.

The files in examples/ (ds_z2.json, ds_z3.json, ds_z3_offload.json) are these configs written out for users
(tests/test_repo.py holds them equal); the trainer fills in batch sizes, clipping and bf16 from its own config.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ZERO_STAGES = (0, 2, 3)
OFFLOADS = ("optimizer", "param")


def parse_offload(text: str | tuple | list) -> tuple[str, ...]:
    """"none" | "optimizer" | "param" | "optimizer,param" (or a sequence of those) → a sorted tuple."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(sorted({str(x).strip() for x in items if str(x).strip() and str(x).strip() != "none"}))


def check_offload(zero: int, offload: tuple[str, ...]) -> None:
    """Raise ValueError (one line, naming the fix) unless ZeRO `zero` can run with CPU `offload`."""
    if zero not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {zero} unsupported; use 0 (no DeepSpeed), 2 or 3")
    unknown = set(offload) - set(OFFLOADS)
    if unknown:
        raise ValueError(f"offload {','.join(sorted(unknown))} unknown; use none, optimizer, param or optimizer,param")
    if offload and zero == 0:
        raise ValueError("offload needs DeepSpeed ZeRO: use ZeRO 2 or 3 (param offload: ZeRO 3), or offload none")
    if "param" in offload and zero != 3:
        raise ValueError(f"param offload needs ZeRO 3 (got ZeRO {zero}); use optimizer offload only")


def deepspeed_config(zero: int, offload: tuple[str, ...] = ()) -> dict:
    """The DeepSpeed config of ZeRO `zero` (2 or 3) with CPU `offload` of the optimizer and/or parameters."""
    check_offload(zero, offload)
    if zero == 0:
        raise ValueError("ZeRO 0 means no DeepSpeed: there is no DeepSpeed config to write")
    z: dict = {"stage": zero, "overlap_comm": False}
    z.update({"contiguous_gradients": True} if zero == 2 else {"stage3_gather_16bit_weights_on_model_save": True})
    for what in offload:
        z[f"offload_{what}"] = {"device": "cpu", "pin_memory": True}
    ds = {"zero_optimization": z, "bf16": {"enabled": "auto"}, "wall_clock_breakdown": False}
    if offload:
        ds["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the host: no DeepSpeed op build needed
    return ds


def read_deepspeed(path: str) -> tuple[int, tuple[str, ...]]:
    """(ZeRO stage, CPU offloads) of a DeepSpeed JSON config file."""
    z = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {})
    offload = tuple(w for w in OFFLOADS if (z.get(f"offload_{w}") or {}).get("device") == "cpu")
    return int(z.get("stage", 0)), offload


@contextlib.contextmanager
def deepspeed_files() -> Iterator[Callable[[int, tuple[str, ...]], str]]:
    """A function (zero, offload) → path of that config written into a temporary folder (removed on exit)."""
    with tempfile.TemporaryDirectory(prefix="spbench-deepspeed-") as tmp:
        def path(zero: int, offload: tuple[str, ...] = ()) -> str:
            file = Path(tmp) / f"ds_z{zero}{''.join('_' + o for o in offload)}.json"
            if not file.exists():
                file.write_text(json.dumps(deepspeed_config(zero, offload), indent=2) + "\n")
            return str(file)

        yield path
