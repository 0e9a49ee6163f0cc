"""`python -m spbench.memory.probe`: the trainer's step of a preset at one length on one GPU; one JSON line out.

The step is `Trainer.step` (the step `spbench train` runs), built through memory/step.py: bf16, random weights,
every sequence `--length` tokens, attention through the runtime at SP 1 (--attention runtime: the fastest
kernel, cuDNN on CUDA) or transformers' own SDPA (--attention sdpa, as a plain setup uses), the memory features
the flags ask for. AdamW's states are created before the first measured step (memory/step.py
prime_optimizer), so the peak is that of a run's steady state. With --steps N the step runs N times: the peak
covers all of them, step_s and tokens_per_s time the last one only (the first call of a shape pays one-off
costs: kernel plans, allocator growth).

Printed (last stdout line): {"schema": "spbench.probe/1", "status": "ok"|"oom"|"error", "oom", "peak_gib"
(torch.cuda.max_memory_allocated), "reserved_gib", "nvml_peak_used_gib" (pynvml, sampled; null without it),
"static_gib" (allocated before the step: weights, AdamW states), "step_s", "tokens_per_s", "loss", ...}.
An OOM exits 0 with "oom": true; any other failure exits 1.

    python -m spbench.memory.probe --model qwen2.5-0.5b --stage sft --length 65536 --attention runtime
    python -m spbench.memory.probe --model qwen2.5-7b --length 32768 --attention sdpa --loss-chunk none --mlp-chunks none --steps 2
    python -m spbench.memory.probe --model tiny --length 256 --device cpu --dtype float32     # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from runtime.config import from_dict
from runtime.train import Trainer

from ..common.schemas import PROBE
from ..common.units import GiB
from .step import StepSpec, add_step_args, prime_optimizer, spec_from_args


class NvmlPeak:
    """Samples NVML 'used' memory of one GPU every `period` s in a thread; `peak_gib` is None without pynvml."""

    def __init__(self, index: int, period: float = 0.05) -> None:
        self.peak_gib: float | None = None
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # pynvml missing or no NVML: the probe still measures torch's peak
            self._nvml = None
        self.period = period

    def _sample(self) -> None:
        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / GiB
        self.peak_gib = used if self.peak_gib is None else max(self.peak_gib, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> "NvmlPeak":
        if self._nvml is not None:
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()


def _nvml_index() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else torch.cuda.current_device()


def cap_memory(device: torch.device, cap_gib: float | None) -> float:
    """Cap this process's allocations on `device` at `cap_gib` (None: the whole card); returns the cap in GiB."""
    total = torch.cuda.get_device_properties(device).total_memory / GiB
    cap = min(cap_gib or total, total)
    if cap < total:
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap


def start_measuring(device: torch.device) -> float:
    """Wait for the device, zero its peak counter; the GiB allocated now (weights, optimizer states, inputs)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GiB


def run_probe(spec: StepSpec, gpu_mem_gib: float | None = None) -> dict:
    """Build the trainer, prime AdamW, run `spec.steps` steps; the probe's JSON dict (status "ok").
    Raises on OOM or any other failure (result_line turns that into a JSON line)."""
    cuda = spec.device == "cuda"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    info: dict = {"device": str(dev)}
    if cuda:
        info.update(device_name=torch.cuda.get_device_name(dev),
                    device_total_gib=torch.cuda.get_device_properties(dev).total_memory / GiB,
                    gpu_mem_gib=cap_memory(dev, gpu_mem_gib))
    trainer = Trainer(from_dict(spec.train_config()))
    info["kernel"] = trainer.attention.kernel.name if trainer.cfg.uses_sp_attention else "sdpa"
    prime_optimizer(trainer)
    if cuda:
        info["static_gib"] = start_measuring(dev)
    nvml = NvmlPeak(_nvml_index()) if cuda else None
    with nvml or contextlib.nullcontext():
        for s in range(spec.steps):
            t0 = time.perf_counter()
            metrics = trainer.step(s)  # reads the loss back: the step has finished on the device
            step_s = time.perf_counter() - t0
    tokens = spec.rows * spec.length
    offload = trainer.policy.last_offload
    info.update(
        status="ok", oom=False, loss=metrics["loss"], attention=spec.attention, steps=spec.steps, step_s=step_s,
        tokens=tokens, tokens_per_s=tokens / step_s,
        peak_gib=torch.cuda.max_memory_allocated(dev) / GiB if cuda else None,
        reserved_gib=torch.cuda.max_memory_reserved(dev) / GiB if cuda else None,
        nvml_peak_used_gib=nvml.peak_gib if nvml else None,
        offloaded_tensors=offload.packed, offloaded_gib=offload.bytes / GiB,  # 0 unless checkpoint offload
    )
    return info


def is_oom(exc: BaseException) -> bool:
    """torch's OOM error, or a library allocation failure that means the same (cuBLAS/cuDNN/NCCL)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def result_line(head: dict, measure: Callable[[], dict]) -> tuple[dict, int]:
    """(the probe's JSON dict, exit code): `measure()`'s result, or its failure as status "oom" (exit 0) / "error"."""
    try:
        out, code = {**head, **measure()}, 0
    except Exception as e:  # noqa: BLE001 — every failure becomes one JSON line; the search records it
        oom = is_oom(e)
        out = {**head, "status": "oom" if oom else "error", "oom": oom,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
        code = 0 if oom else 1
    out["torch"] = torch.__version__
    return out, code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spbench.memory.probe", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    head = {"schema": PROBE, "model": args.model, "stage": args.stage, "length": args.length}

    def measure() -> dict:
        spec = spec_from_args(args)
        return {**run_probe(spec, args.gpu_mem_gib), "features": spec.features.to_json()}

    out, code = result_line(head, measure)
    print(json.dumps(out), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
