"""`spbench maxlen`: the longest trainable sequence per model and stage: measured on a GPU, or estimated.

With a CUDA GPU (and without --estimate) the length is measured by an OOM-safe search: start from the memory
model's prediction, grow or shrink geometrically until one probe succeeds and one fails, then bisect to the
resolution. Each probe is one full training step (`Trainer.step`) in a fresh process
(`python -m spbench.memory.probe` on one GPU without DeepSpeed; otherwise `python -m spbench.memory.distprobe`,
the trainer on --gpus ranks: SP, ZeRO, offload — NCCL when the machine has that many GPUs, or with --emulate
that many gloo ranks sharing GPU 0, each capped at --gpu-mem). An OOM, a crash or a timeout is a failed probe
and the search goes on; every probe is appended to <out>/probes.jsonl at once, and --resume skips probes
already done. A setup the machine cannot run is estimated. Without a GPU, or with --estimate, the answer is
the memory model's (spbench/memory/model.py), labelled "estimated". Results go to --out (default out/maxlen).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.memory import AUTO, DEFAULT_LOSS_CHUNK, DEFAULT_NORM_CHUNK, MemoryFeatures
from runtime.models import ModelError, model_config

from ..common.deepspeed import check_offload, parse_offload
from ..common.errors import UsageError
from ..common.results import writable_folder
from ..common.schemas import MAXLEN_SUITE
from ..common.suites import read_suite
from ..memory.depth import TRACE_DEPTHS
from ..memory.maxlen import Target, run_targets
from ..memory.setup import CUDA_CONTEXT_GIB, FINETUNING, GPU_KERNELS, SP_METHODS, STAGES, Setup

EPILOG = """examples:
  spbench maxlen --model qwen2.5-7b                                   # 8 × 80 GiB, SP 8, ZeRO-3 + offload, estimated
  spbench maxlen --suite maxlen-qwen2.5 --json                        # the seed table, ours vs plain
  spbench maxlen --suite maxlen-qwen2.5 --out reports/maxlen          # publish it
  spbench maxlen --model qwen2.5-7b --no-tiled-loss --no-tiled-mlp --no-tiled-norm   # plain transformers
  spbench maxlen --model qwen2.5-7b --finetuning-type full,lora       # LoRA rows next to full fine-tuning
  spbench maxlen --model qwen2.5-0.5b,qwen2.5-7b --gpus 1 --zero 0 --offload none --gpu-mem 139 --stage sft,dpo
  spbench maxlen --model qwen2.5-0.5b --gpus 1 --zero 0 --offload none --out runs/maxlen --resume   # on a GPU
  spbench maxlen --model qwen2.5-7b --checkpoint-offload --trace search --resolution 65536   # traced on CPU
  spbench maxlen --suite maxlen-qwen2.5 --trace check --out reports/maxlen-trace             # model vs trace, every row
  spbench maxlen --model qwen2.5-7b --checkpoint-offload --trace check --trace-depth full    # every layer traced
"""


def add_arguments(p) -> None:
    p.add_argument("--model", help="preset(s) or checkpoint dir(s), comma separated (e.g. qwen2.5-7b,qwen2.5-14b)")
    p.add_argument("--suite", help="shipped maxlen suite (maxlen-qwen2.5) or a TOML path; flags given override it")
    p.add_argument("--stage", help="sft, dpo or sft,dpo (default sft)")
    p.add_argument("--finetuning-type",
                   help="full, lora or full,lora (lora: gradients and AdamW states of the adapters only, no DPO "
                        "reference model; default full; replaces a suite's variants like the feature flags)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank r on every decoder linear (default 8)")
    p.add_argument("--gpus", type=int, help="GPUs in the job (default 8)")
    p.add_argument("--gpu-mem", type=float, help="GiB per GPU as the driver reports it (default 80)")
    p.add_argument("--sp", help="SP size(s), comma separated (default: --gpus)")
    p.add_argument("--sp-method", choices=SP_METHODS,
                   help="SP strategy (default auto: ulysses where the runtime can split the heads, else hybrid)")
    p.add_argument("--attention-kernel", choices=GPU_KERNELS,
                   help="the GPU's attention kernel (default cuda-cudnn, what the runtime's auto picks; cuda-cudnn and "
                        "cuda-flash expand K/V for GQA, flash-attn does not)")
    p.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0|2|3 (0: no DeepSpeed; default 3)")
    p.add_argument("--offload", help="none, optimizer, param or optimizer,param (default optimizer,param)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer activation checkpointing (default on)")
    p.add_argument("--no-tiled-loss", action="store_true", help="full-vocabulary logits (plain transformers)")
    p.add_argument("--no-tiled-mlp", action="store_true", help="untiled MLP (plain transformers)")
    p.add_argument("--no-tiled-norm", action="store_true", help="transformers' RMSNorm, untiled (plain transformers)")
    p.add_argument("--checkpoint-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep checkpointed hidden states in CPU memory (default off)")
    p.add_argument("--estimate", action="store_true", help="memory-model prediction even when a GPU is present")
    p.add_argument("--emulate", action="store_true",
                   help="measure a --gpus N setup on one GPU: N gloo ranks share GPU 0, each capped at --gpu-mem")
    p.add_argument("--trace", choices=["search", "check"],
                   help="CPU, no GPU: each probe is the trainer's step traced on fake tensors on the SP rank that "
                        "peaks (rank 0; blockwise attention: the larger of ranks 0 and sp - 1; "
                        "spbench/memory/traced.py; ZeRO's static terms from the model). search: bracket and bisect "
                        "on traced peaks (rows labelled traced); check: one trace per row at the model's max length, "
                        "model vs trace")
    p.add_argument("--trace-depth", choices=TRACE_DEPTHS,
                   help="with --trace and ZeRO: extrapolated (default; the step traced at 2 and 3 decoder layers, "
                        "extended linearly to the model's depth, byte-exact against full-depth traces: "
                        "spbench/memory/depth.py) or full (every layer: slower by about depth / 5)")
    p.add_argument("--resume", action="store_true", help="skip probes already in <out>/probes.jsonl (with --trace check: rows already traced)")
    p.add_argument("--out", default="out/maxlen", help="directory for probes.jsonl and maxlen.json (default out/maxlen; "
                   "publish with --out reports/maxlen)")
    p.add_argument("--resolution", type=int, help="search/estimate resolution in tokens (default 1024)")
    p.add_argument("--probe-timeout", type=float, default=1800, help="seconds before a probe counts as failed")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line (schema spbench.maxlen/1)")


def _csv(value) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def _int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be an integer, got {value!r}") from None


def load_suite(name: str) -> dict:
    """A maxlen suite (schema spbench.maxlen-suite/1): a shipped name (maxlen-qwen2.5) or a TOML path."""
    source, doc = read_suite(name, "maxlen", prefix="maxlen")
    if doc.get("schema") != MAXLEN_SUITE:
        raise UsageError(f"suite {source}: schema must be {MAXLEN_SUITE!r}, got {doc.get('schema')!r}")
    known = {"schema", "description", "models", "stages", "gpus", "gpu_mem_gib", "sp", "sp_method", "attention_kernel", "zero",
             "offload", "resolution", "variants"}
    extra = set(doc) - known
    if extra:
        raise UsageError(f"suite {source}: unknown keys {sorted(extra)}; known: {sorted(known)}")
    return doc


VARIANT_KEYS = {"name", "tiled_loss", "tiled_mlp", "tiled_norm", "checkpoint_offload", "gradient_checkpointing", "loss_chunk",
                "finetuning", "lora_rank"}


def _variant_features(v: dict, where: str) -> MemoryFeatures:
    extra = set(v) - VARIANT_KEYS
    if extra or "name" not in v:
        raise UsageError(f"{where}: a variant needs 'name' and only {sorted(VARIANT_KEYS)}; got {sorted(v)}")
    try:
        return MemoryFeatures(
            tiled_loss_chunk=int(v.get("loss_chunk", DEFAULT_LOSS_CHUNK)) if v.get("tiled_loss", True) else None,
            tiled_mlp_chunks=AUTO if v.get("tiled_mlp", True) else None,
            tiled_norm_chunk=DEFAULT_NORM_CHUNK if v.get("tiled_norm", True) else None,
            checkpoint_offload=bool(v.get("checkpoint_offload", False)),
            gradient_checkpointing=bool(v.get("gradient_checkpointing", True)))
    except ValueError as e:
        raise UsageError(f"{where}: variant {v['name']!r}: {e}") from None


def build_targets(args) -> tuple[list[Target], int]:
    """The cases the command line (and suite) ask for, validated; and the resolution."""
    suite = load_suite(args.suite) if args.suite else {}
    pick = lambda flag, key, default: flag if flag is not None else suite.get(key, default)  # noqa: E731
    models = _csv(pick(args.model, "models", ""))
    if not models:
        raise UsageError("no model given: pass --model qwen2.5-7b[,qwen2.5-14b,...] or --suite FILE")
    for m in models:
        try:
            model_config(m)
        except ModelError as e:
            raise UsageError(str(e)) from None
    stages = _csv(pick(args.stage, "stages", "sft"))
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise UsageError(f"--stage {','.join(bad) or '(empty)'} unknown; use sft, dpo or sft,dpo")
    gpus = _int("--gpus", pick(args.gpus, "gpus", 8))
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    try:
        gpu_mem = float(pick(args.gpu_mem, "gpu_mem_gib", 80))
    except (TypeError, ValueError):
        raise UsageError(f"--gpu-mem must be a number of GiB, got {pick(args.gpu_mem, 'gpu_mem_gib', 80)!r}") from None
    if gpu_mem <= CUDA_CONTEXT_GIB:
        raise UsageError(f"--gpu-mem {gpu_mem:g} GiB is too small; give the GPU's memory in GiB, e.g. 80")
    sps = [_int("--sp", s) for s in _csv(pick(args.sp, "sp", gpus))]
    for sp in sps:
        if sp < 1 or gpus % sp:
            raise UsageError(f"--sp {sp} must be >= 1 and divide --gpus {gpus}")
    zero = _int("--zero", pick(args.zero, "zero", 3))
    offload = parse_offload(_csv(pick(args.offload, "offload", "optimizer,param")))
    try:
        check_offload(zero, offload)
    except ValueError as e:
        raise UsageError(f"--zero {zero} --offload {','.join(offload) or 'none'}: {e}") from None
    sp_method = pick(args.sp_method, "sp_method", "auto")
    if sp_method not in SP_METHODS:
        raise UsageError(f"sp_method {sp_method!r} unknown; use {', '.join(SP_METHODS)}")
    kernel = _gpu_kernel(pick(args.attention_kernel, "attention_kernel", GPU_KERNELS[0]))
    resolution = _int("--resolution", pick(args.resolution, "resolution", 1024))
    if resolution < 1:
        raise UsageError(f"--resolution must be >= 1 token, got {resolution}")
    flags_given = (args.no_tiled_loss or args.no_tiled_mlp or args.no_tiled_norm or args.checkpoint_offload is not None
                   or args.gradient_checkpointing is not None or args.finetuning_type is not None)
    if flags_given or "variants" not in suite:
        ckpt = True if args.gradient_checkpointing is None else args.gradient_checkpointing
        variant = {"name": "cli", "tiled_loss": not args.no_tiled_loss, "tiled_mlp": not args.no_tiled_mlp,
                   "tiled_norm": not args.no_tiled_norm,
                   "checkpoint_offload": bool(args.checkpoint_offload), "gradient_checkpointing": ckpt}
        feats = _variant_features(variant, "flags")
        variants = [(_variant_name(feats) + ("+lora" if ft == "lora" else ""), feats, ft, args.lora_rank)
                    for ft in _finetuning(args)]
    else:
        variants = [(v.get("name"), _variant_features(v, f"suite {args.suite!r}"), *_variant_lora(v, args))
                    for v in suite["variants"]]
    targets = [Target(name, Setup(m, st, gpus, gpu_mem, sp, zero, frozenset(offload), feats, sp_method,
                                  finetuning=ft, lora_rank=rank, attention_kernel=kernel))
               for m in models for st in stages for name, feats, ft, rank in variants for sp in sps]
    return targets, resolution


def _gpu_kernel(name: str) -> str:
    if name not in GPU_KERNELS:
        raise UsageError(f"attention_kernel {name!r} unknown; use {', '.join(GPU_KERNELS)}")
    return name


def _variant_lora(v: dict, args) -> tuple[str, int]:
    """(finetuning, lora rank) of a suite variant: its own keys (default full, rank 8); --lora-rank overrides."""
    ft, rank = v.get("finetuning", "full"), int(v.get("lora_rank", 8) if args.lora_rank is None else args.lora_rank)
    if ft not in FINETUNING or rank < 1:
        raise UsageError(f"suite {args.suite!r}: variant {v.get('name')!r}: finetuning {ft!r} (lora_rank {rank}); "
                         "use full or lora, lora_rank >= 1")
    return ft, rank


def _finetuning(args) -> list[str]:
    """--finetuning-type as a list (full, lora or both), --lora-rank checked."""
    finetuning = _csv(args.finetuning_type or "full")
    bad = [f for f in finetuning if f not in FINETUNING]
    if bad or not finetuning:
        raise UsageError(f"--finetuning-type {','.join(bad) or '(empty)'} unknown; use full, lora or full,lora")
    if args.lora_rank is None:
        args.lora_rank = 8
    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    return finetuning


def _variant_name(f: MemoryFeatures) -> str:
    """plain / ours / ours+ckpt-offload for the usual combinations, else custom."""
    plain, ours = MemoryFeatures.plain(), MemoryFeatures()
    names = {plain: "plain", ours: "ours", MemoryFeatures(checkpoint_offload=True): "ours+ckpt-offload"}
    return names.get(f, "custom")


def _command(args) -> str:
    """The command line these args stand for (for provenance)."""
    parts = ["spbench", "maxlen"]
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value in (None, False):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def run(args, probe_factory=None, gpus=None) -> int:
    """`spbench maxlen`. `probe_factory(target, backend)` → probe callable and `gpus()` → (count, GiB) let tests
    stand in for a GPU machine."""
    targets, resolution = build_targets(args)
    writable_folder(args.out, "--out")
    extra = {} if gpus is None else {"gpus": gpus}
    if args.trace and (args.estimate or args.emulate):
        raise UsageError("--trace runs on the CPU: it cannot be combined with --estimate or --emulate")
    if args.trace_depth and not args.trace:
        raise UsageError("--trace-depth says how deep --trace traces: give --trace search or --trace check too")
    return run_targets(targets, resolution, Path(args.out), _command(args), estimate=args.estimate,
                       emulate=args.emulate, resume=args.resume, probe_timeout=args.probe_timeout, as_json=args.json,
                       trace=args.trace, trace_depth=args.trace_depth or TRACE_DEPTHS[0],
                       probe_factory=probe_factory, **extra)
