"""`python -m spbench.probe`: one full training step of a preset at one length on one GPU; one JSON line out.

The step is what `spbench maxlen` searches over: build the preset in bf16 (random weights; attention through
the spbench runtime at SP 1 with the fastest kernel — cuDNN on CUDA — or, with --attention sdpa, transformers'
own SDPA as a plain setup uses), apply the memory features (runtime/memory.py) and gradient checkpointing, run forward, backward and an AdamW step of
SFT, or of DPO (chosen + rejected rows, and a frozen reference model's forward under no_grad), on random
tokens of the given length. AdamW's states are created before the measured step (a step on zero gradients),
so the peak is that of a run's steady state (step ≥ 2), the regime the memory model predicts. With --steps N
the step runs N times: the peak covers all of them, step_s and tokens_per_s time the last one only (the first
call of a shape pays one-off costs: kernel plans, allocator growth).

Printed (last stdout line): {"schema": "spbench.probe/1", "status": "ok"|"oom"|"error", "oom", "peak_gib"
(torch.cuda.max_memory_allocated), "reserved_gib", "nvml_peak_used_gib" (pynvml, sampled; null without it),
"static_gib" (allocated before the step: weights, AdamW states, inputs),
"step_s", "tokens_per_s", "loss", ...}. An OOM exits 0 with "oom": true; any other failure exits 1.

    python -m spbench.probe --model qwen2.5-0.5b --stage sft --length 65536
    python -m spbench.probe --model qwen2.5-7b --length 32768 --attention sdpa --loss-chunk none --mlp-chunks none --steps 2
    python -m spbench.probe --model tiny --length 256 --device cpu --dtype float32     # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.attention import SPAttention
from runtime.blockattn import SeqMeta
from runtime.config import DTYPES
from runtime.hf import SPBatch, register_sp_attention
from runtime.kernels import select_kernel
from runtime.layout import ShardPlan
from runtime.losses import IGNORE, preference_loss, sequence_sums, sft_loss, token_logprobs
from runtime.memory import AUTO, MemoryFeatures, apply_tiled_mlp, forward_context, prepare_model, resolve_mlp_chunks
from runtime.models import build_model
from runtime.topology import single_process_context

SCHEMA = "spbench.probe/1"
GiB = 2**30
ATTENTION = ("spbench", "sdpa")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: model preset, stage, tokens per sequence, memory features, optional memory cap (GiB),
    attention ("spbench": the runtime's, "sdpa": transformers'), and how many steps run (the last is timed)."""

    model: str
    stage: str
    length: int
    features: MemoryFeatures = field(default_factory=MemoryFeatures)
    gpu_mem_gib: float | None = None
    seed: int = 0
    attention: str = "spbench"
    steps: int = 1

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r} is unknown; use one of {', '.join(ATTENTION)}")
        if self.steps < 1 or self.length < 1:
            raise ValueError(f"steps ({self.steps}) and length ({self.length}) must be ≥ 1")

    @property
    def rows(self) -> int:
        return 2 if self.stage == "dpo" else 1


def training_step(model, ref, optimizer, ids: torch.Tensor, targets: torch.Tensor, features: MemoryFeatures,
                  **model_kwargs):
    """One full step on ids/targets [rows, s]: SFT (ref None) or DPO (rows = chosen, rejected).
    `model_kwargs` go to every decoder call (sp_batch for the spbench attention).

    Returns (loss, OffloadStats of the decoder forward: what checkpoint offload moved to CPU)."""
    chunk = features.tiled_loss_chunk
    if ref is not None:  # reference log-probs first, as DPO trainers precompute them: nothing stored
        with torch.no_grad():
            ref_hidden = ref.model(input_ids=ids, **model_kwargs).last_hidden_state  # [2, s, h]
            ref_sums, _ = sequence_sums(token_logprobs(ref_hidden, ref.lm_head, targets, chunk), targets)
            del ref_hidden
    with forward_context(features) as offload:
        hidden = model.model(input_ids=ids, **model_kwargs).last_hidden_state  # [rows, s, h]
    logp = token_logprobs(hidden, model.lm_head, targets, chunk_tokens=chunk)  # [rows, s]
    if ref is None:
        loss = sft_loss(logp, targets, int((targets != IGNORE).sum()))
    else:
        pi, lengths = sequence_sums(logp, targets)  # [2], [2]
        out = preference_loss("sigmoid", pi[:1], pi[1:], ref_sums[:1], ref_sums[1:], lengths[:1], lengths[1:], beta=0.1)
        loss = out.losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), offload


def prime_optimizer(model, optimizer) -> None:
    """Create AdamW's states now (a step on zero gradients), so the measured step carries them like step ≥ 2."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else torch.cuda.current_device()


def run_probe(spec: ProbeSpec, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Build, prime and run one step; returns the probe's JSON dict (status "ok"). Raises on OOM/failure."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    info: dict = {"device": str(dev)}
    if cuda:
        total = torch.cuda.get_device_properties(dev).total_memory / GiB
        info.update(device_name=torch.cuda.get_device_name(dev), device_total_gib=total)
        cap = min(spec.gpu_mem_gib or total, total)
        if cap < total:
            torch.cuda.set_per_process_memory_fraction(cap / total, dev)
        info["gpu_mem_gib"] = cap
    attn_impl = register_sp_attention() if spec.attention == "spbench" else "sdpa"
    with torch.device(dev):
        model = build_model(spec.model, dtype, attn_impl, seed=spec.seed)
        ref = build_model(spec.model, dtype, attn_impl, seed=spec.seed) if spec.stage == "dpo" else None
    kwargs = {}
    if spec.attention == "spbench":  # SP 1: one local attention over the whole sequence, fastest kernel
        attention = SPAttention("ring", single_process_context(), select_kernel("auto", dev, dtype))
        meta = SeqMeta.build(ShardPlan.for_length(spec.length, 1, 1, zigzag=False), spec.length, causal=True)
        kwargs["sp_batch"] = SPBatch(attention, meta)
        info["kernel"] = attention.kernel.name
    model.train()
    hidden_size = model.config.hidden_size
    prepare_model(model, spec.features, spec.rows * spec.length, hidden_size)
    if ref is not None:
        ref.eval().requires_grad_(False)
        chunks = resolve_mlp_chunks(spec.features, spec.rows * spec.length, hidden_size)
        if chunks is not None:
            apply_tiled_mlp(ref, chunks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prime_optimizer(model, optimizer)
    g = torch.Generator(device=dev).manual_seed(spec.seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (spec.rows, spec.length), device=dev, generator=g)
    targets = torch.randint(0, vocab, (spec.rows, spec.length), device=dev, generator=g)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        info["static_gib"] = torch.cuda.memory_allocated(dev) / GiB  # weights, optimizer states, inputs
    nvml = NvmlPeak(_nvml_index()) if cuda else None
    with nvml or contextlib.nullcontext():
        for _ in range(spec.steps):
            t0 = time.perf_counter()
            loss, offload = training_step(model, ref, optimizer, ids, targets, spec.features, **kwargs)
            if cuda:
                torch.cuda.synchronize(dev)
            step_s = time.perf_counter() - t0
    tokens = spec.rows * spec.length
    info.update(
        status="ok", oom=False, loss=loss, attention=spec.attention, steps=spec.steps, step_s=step_s, tokens=tokens, tokens_per_s=tokens / step_s,
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


# ------------------------------------------------------------------ running probes from another process
class SubprocessProbe:
    """Runs one probe per call in a fresh process; never raises for a failed probe (used by spbench maxlen).

    `case` has model, stage, features, gpu_mem_gib, gpus, sp, sp_method, zero, offload (spbench.maxlen.Case).
    `backend` "single": `python -m spbench.probe` on one GPU; "nccl" or "gloo-cuda": `python -m spbench.distprobe`
    with the trainer on case.gpus ranks (one GPU each, or all emulated on GPU 0), each capped at gpu_mem_gib.
    `command` replaces the argv prefix (default: this Python, -m <module>); the probe's flags follow it.
    Returns the probe's last JSON line, or {"status": "timeout"} / {"status": "error", "error": ...}.
    """

    def __init__(self, case, timeout_s: float, command: list[str] | None = None, backend: str = "single") -> None:
        self.case, self.timeout_s, self.backend = case, timeout_s, backend
        module = "spbench.probe" if backend == "single" else "spbench.distprobe"
        self.command = command or [sys.executable, "-m", module]

    def argv(self, length: int) -> list[str]:
        c = self.case
        args = [*step_flags(c.model, c.stage, length, c.features), "--gpu-mem-gib", str(c.gpu_mem_gib)]
        if self.backend != "single":
            args += ["--nproc", str(c.gpus), "--sp", str(c.sp), "--method", c.sp_method, "--zero", str(c.zero),
                     "--offload", ",".join(c.offload) or "none", "--backend", self.backend,
                     "--timeout", f"{self.timeout_s:g}"]
        return [*self.command, *args]

    def __call__(self, length: int) -> dict:
        t0 = time.monotonic()
        try:
            proc = subprocess.run(self.argv(length), capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "oom": False, "error": f"probe exceeded {self.timeout_s:g} s",
                    "wall_s": time.monotonic() - t0}
        result = last_json(proc.stdout)
        if result is None:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            result = {"status": "error", "oom": False, "error": f"exit {proc.returncode}, no JSON: {tail[0][:300]}"}
        result.setdefault("status", "error")
        result["wall_s"] = time.monotonic() - t0
        return result


def last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (the convention of every spbench --json output)."""
    for line in reversed((text or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None



def step_flags(model: str, stage: str, length: int, features: MemoryFeatures) -> list[str]:
    """The add_step_args flags for one step of `model` (the inverse of features_from_args)."""
    f = features
    flags = ["--model", model, "--stage", stage, "--length", str(length),
             "--loss-chunk", "none" if f.tiled_loss_chunk is None else str(f.tiled_loss_chunk),
             "--mlp-chunks", "none" if f.tiled_mlp_chunks is None else str(f.tiled_mlp_chunks)]
    if f.checkpoint_offload:
        flags.append("--checkpoint-offload")
    flags.append("--gradient-checkpointing" if f.gradient_checkpointing else "--no-gradient-checkpointing")
    return flags


def features_from_args(args) -> MemoryFeatures:
    """The MemoryFeatures the step flags (add_step_args) ask for."""
    loss = None if args.loss_chunk == "none" else int(args.loss_chunk)
    mlp = None if args.mlp_chunks == "none" else (AUTO if args.mlp_chunks == AUTO else int(args.mlp_chunks))
    return MemoryFeatures(tiled_loss_chunk=loss, tiled_mlp_chunks=mlp, checkpoint_offload=args.checkpoint_offload,
                          gradient_checkpointing=args.gradient_checkpointing)


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The flags every probe takes: what one training step is (shared with spbench.distprobe)."""
    p.add_argument("--model", required=True)
    p.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    p.add_argument("--length", type=int, required=True, help="tokens per sequence (DPO: each of chosen, rejected)")
    p.add_argument("--loss-chunk", default="1024", help="tiled-loss chunk tokens, or 'none'")
    p.add_argument("--mlp-chunks", default=AUTO, help="tiled-MLP chunks: 'auto', a count, or 'none'")
    p.add_argument("--checkpoint-offload", action="store_true")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="cap this process's GPU memory (GiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1, help="steps to run; the last one is timed (default 1)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spbench.probe", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--attention", choices=ATTENTION, default="spbench",
                   help="spbench: the runtime's attention (SP 1, kernel auto); sdpa: transformers' own (default spbench)")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    head = {"schema": SCHEMA, "model": args.model, "stage": args.stage, "length": args.length}

    def measure() -> dict:
        spec = ProbeSpec(args.model, args.stage, args.length, features_from_args(args), args.gpu_mem_gib, args.seed,
                         args.attention, args.steps)
        return {**run_probe(spec, args.device, DTYPES[args.dtype]), "features": spec.features.to_json()}

    out, code = result_line(head, measure)
    print(json.dumps(out), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
