"""The one constructor of a measured training step: probes, distributed probes and traces all run `Trainer.step`.

A `StepSpec` says what one measured step is (model, stage, tokens per sequence, memory features, attention,
SP layout, DeepSpeed); `train_config` turns it into the trainer config that runs it: every sequence exactly
`length` tokens (dataset synthetic-full), one sequence (DPO: pair) per micro-batch and DP rank, one row per
step. `prime_optimizer` creates AdamW's states before the measured step, so its peak is that of a run's
steady state (step ≥ 2), the regime the memory model predicts.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from runtime.attention import METHODS
from runtime.config import ATTENTION, DTYPES
from runtime.memory import AUTO, MemoryFeatures


@dataclass(frozen=True)
class StepSpec:
    """One measured step. `attention`: TrainConfig.attention (auto | runtime | sdpa); `nproc` ranks with SP
    `sp` (DP = nproc / sp); `deepspeed`: a DeepSpeed JSON path or None; `steps` run (the last one is timed)."""

    model: str
    stage: str
    length: int
    features: MemoryFeatures = field(default_factory=MemoryFeatures)
    attention: str = "auto"
    steps: int = 1
    dtype: str = "bfloat16"
    device: str = "cuda"
    nproc: int = 1
    sp: int = 1
    method: str = "ulysses"
    deepspeed: str | None = None
    seed: int = 0
    finetuning: str = "full"
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r} is unknown; use one of {', '.join(ATTENTION)}")
        if self.steps < 1 or self.length < 1:
            raise ValueError(f"steps ({self.steps}) and length ({self.length}) must be ≥ 1")

    @property
    def rows(self) -> int:
        return 2 if self.stage == "dpo" else 1

    def train_config(self, out_dir: str = "out/probe") -> dict:
        """The trainer config of this step: full-length synthetic rows, one per DP rank and step."""
        f, dp = self.features, self.nproc // self.sp
        return {"model_name_or_path": self.model, "stage": self.stage, "dataset": "synthetic-full",
                "max_samples": dp * self.steps, "cutoff_len": self.length, "sequence_parallel_size": self.sp,
                "sequence_parallel_mode": self.method, "attention": self.attention, "dtype": self.dtype,
                "max_steps": self.steps, "learning_rate": 1e-6, "seed": self.seed,
                "gradient_checkpointing": f.gradient_checkpointing, "tiled_loss_chunk": f.tiled_loss_chunk,
                "tiled_mlp_chunks": f.tiled_mlp_chunks, "tiled_norm_chunk": f.tiled_norm_chunk,
                "checkpoint_offload": f.checkpoint_offload,
                "deepspeed": self.deepspeed, "output_dir": out_dir, "device": self.device,
                "finetuning_type": self.finetuning, "lora_rank": self.lora_rank}


def prime_optimizer(trainer) -> None:
    """Create the trainer's AdamW states now (a step on zero gradients: no parameter moves), so the measured
    step carries them as every step ≥ 2 does. DeepSpeed allocates its states at initialisation already."""
    if trainer.engine is not None:
        return
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    """This process as rank `rank` of a `world`-rank fake process group (collectives return at once, move nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; run a fake step in a fresh process")
    hook = sys.excepthook  # init wraps it to prefix "[rankN]:"; one fake rank after another would stack prefixes
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


@contextlib.contextmanager
def fake_step(spec: StepSpec, rank: int = 0, overrides: dict | None = None, fake: bool = True,
              layers: int | None = None) -> Iterator[tuple]:
    """ONE step of `spec` as SP rank `rank` of `spec.sp` (DP 1), in this process: yields (trainer, micro_batches)
    inside `FakeTensorMode` (shapes and dtypes only: a 7B model at 4M tokens allocates nothing) and, with SP, a fake
    process group; AdamW's states primed. The caller runs `trainer.step(0, micro_batches=..., read_back=False)`.

    The data (Python lists, small CPU tensors) is built first, outside the fake mode, and the step's data order
    is memoised there. `overrides`: extra train config keys; `fake=False`: real tensors (small shapes); `layers`:
    the preset built with that many decoder layers (memory/depth.py's reduced-depth traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from runtime.config import from_dict
    from runtime.models import build_model, model_config
    from runtime.records import build_schedule, load_tokenizer
    from runtime.topology import single_process_context
    from runtime.train import Trainer, context_for

    spec = replace(spec, nproc=spec.sp, device="cpu")
    cfg = from_dict({**spec.train_config(), **(overrides or {})})
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    schedule = build_schedule(cfg, 1, tokenizer, model_config(spec.model).vocab_size)
    micro_batches = schedule.micro_batches(0, 0, tokenizer.pad_id)
    schedule.step_denominator(0, cfg.stage)
    group = fake_rank(rank, spec.sp) if spec.sp > 1 else contextlib.nullcontext()
    with group:
        pc = context_for(cfg) if spec.sp > 1 else single_process_context()  # rank arithmetic: real tensors
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
                trainer = Trainer(cfg, pc, schedule=schedule, build=functools.partial(build_model, num_layers=layers))
                prime_optimizer(trainer)
                yield trainer, micro_batches
        finally:
            if spec.sp > 1:
                pc.destroy()


# ------------------------------------------------------------------------------------------------ flags
def step_flags(spec: StepSpec) -> list[str]:
    """The add_step_args flags for one step of `spec` (the inverse of spec_from_args, for one process)."""
    f = spec.features
    flags = ["--model", spec.model, "--stage", spec.stage, "--length", str(spec.length),
             "--loss-chunk", "none" if f.tiled_loss_chunk is None else str(f.tiled_loss_chunk),
             "--mlp-chunks", "none" if f.tiled_mlp_chunks is None else str(f.tiled_mlp_chunks),
             "--norm-chunk", "none" if f.tiled_norm_chunk is None else str(f.tiled_norm_chunk)]
    if f.checkpoint_offload:
        flags.append("--checkpoint-offload")
    flags.append("--gradient-checkpointing" if f.gradient_checkpointing else "--no-gradient-checkpointing")
    flags += ["--finetuning-type", spec.finetuning, "--lora-rank", str(spec.lora_rank)] if spec.finetuning == "lora" else []
    return [*flags, "--attention", spec.attention, "--steps", str(spec.steps)]


def features_from_args(args) -> MemoryFeatures:
    """The MemoryFeatures the step flags (add_step_args) ask for."""
    loss = None if args.loss_chunk == "none" else int(args.loss_chunk)
    mlp = None if args.mlp_chunks == "none" else (AUTO if args.mlp_chunks == AUTO else int(args.mlp_chunks))
    norm = None if args.norm_chunk == "none" else int(args.norm_chunk)
    return MemoryFeatures(tiled_loss_chunk=loss, tiled_mlp_chunks=mlp, tiled_norm_chunk=norm,
                          checkpoint_offload=args.checkpoint_offload, gradient_checkpointing=args.gradient_checkpointing)


def add_feature_args(p: argparse.ArgumentParser) -> None:
    """The memory-feature flags (defaults: runtime.memory.MemoryFeatures()) that features_from_args reads."""
    d = MemoryFeatures()
    p.add_argument("--loss-chunk", default=str(d.tiled_loss_chunk), help="tiled-loss chunk tokens, or 'none'")
    p.add_argument("--mlp-chunks", default=str(d.tiled_mlp_chunks), help="tiled-MLP chunks: 'auto', a count, or 'none'")
    p.add_argument("--norm-chunk", default=str(d.tiled_norm_chunk), help="tiled-RMSNorm chunk tokens, or 'none'")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d.gradient_checkpointing)


def add_step_args(p: argparse.ArgumentParser, steps: int = 1) -> None:
    """The flags every probe takes: what one training step is (spbench.memory.probe and .distprobe)."""
    p.add_argument("--model", required=True)
    p.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    p.add_argument("--length", type=int, required=True, help="tokens per sequence (DPO: each of chosen, rejected)")
    add_feature_args(p)
    p.add_argument("--checkpoint-offload", action="store_true")
    p.add_argument("--attention", choices=ATTENTION, default="auto",
                   help="auto (runtime attention with SP, else transformers' sdpa) | runtime | sdpa")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="cap each rank's GPU memory at this many GiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=steps, help=f"steps to run; the last one is timed (default {steps})")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--method", choices=METHODS, default="ulysses", help="SP strategy (default ulysses)")
    p.add_argument("--finetuning-type", choices=["full", "lora"], default="full", help="full or lora (peft adapters)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")


def spec_from_args(args, nproc: int = 1, sp: int = 1, deepspeed: str | None = None) -> StepSpec:
    """The StepSpec the step flags describe (nproc, sp and the DeepSpeed file come from the caller)."""
    return StepSpec(args.model, args.stage, args.length, features_from_args(args), args.attention, args.steps,
                    args.dtype, "cpu" if args.device == "cpu" else "cuda", nproc, sp, args.method, deepspeed, args.seed,
                    args.finetuning_type, args.lora_rank)
