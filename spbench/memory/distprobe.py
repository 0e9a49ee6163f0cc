"""`python -m spbench.memory.distprobe`: the trainer's own steps on N ranks at one length; one JSON line out.

`spbench.memory.probe` measures one GPU without DeepSpeed; this runs the real trainer (runtime/train.py) with sequence
parallelism, ZeRO and offload, which is what `spbench maxlen` measures for multi-GPU setups: NCCL with one GPU per
rank, or N ranks emulated on one GPU (--backend gloo-cuda: gloo collectives on CUDA tensors, P2P staged through
CPU, each rank capped at --gpu-mem-gib). Every sequence holds exactly --length tokens (dataset synthetic-full);
the trainer's AdamW states exist from step 1, so the peak over --steps steps (default 2) is the steady state.

Printed (last stdout line), as spbench.memory.probe: {"schema": "spbench.probe/1", "status": "ok"|"oom"|"error", "oom",
"peak_gib" (the largest rank's torch.cuda.max_memory_allocated), "rank_peak_gib" (per rank), "static_gib",
"step_s" (rank 0's last step), "tokens" (one step, all ranks), "tokens_per_s", ...}. An OOM on any rank exits 0
with "oom": true; any other failure exits 1.

    python -m spbench.memory.distprobe --model qwen2.5-7b --length 262144 --nproc 8 --zero 3 --offload optimizer,param
    python -m spbench.memory.distprobe --model qwen2.5-0.5b --length 65536 --nproc 4 --backend gloo-cuda --gpu-mem-gib 34
    python -m spbench.memory.distprobe --model tiny --length 256 --nproc 2 --device cpu --dtype float32   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ..common.backend import BACKENDS, choose_backend
from ..common.deepspeed import check_offload, deepspeed_files, parse_offload
from ..common.errors import RankError
from ..common.pool import RankPool
from ..common.schemas import PROBE
from ..common.units import GiB
from .probe import cap_memory, result_line, start_measuring
from .step import StepSpec, add_step_args, prime_optimizer, spec_from_args


def measure_on_rank(info, cfg_values: dict, cap_gib: float | None) -> dict:
    """Rank job: cap this process's GPU memory, build the trainer, run its steps; this rank's figures."""
    from runtime.config import from_dict
    from runtime.train import Trainer, context_for

    cuda = info.device.startswith("cuda")
    if cuda:
        cap_memory(torch.device(info.device), cap_gib)
    cfg = from_dict(cfg_values)
    pc = context_for(cfg)
    try:
        trainer = Trainer(cfg, pc)
        prime_optimizer(trainer)
        static = start_measuring(torch.device(info.device)) if cuda else None
        history = trainer.train()
    finally:
        pc.destroy()
    return {"peak_gib": torch.cuda.max_memory_allocated(info.device) / GiB if cuda else None, "static_gib": static,
            "step_s": history[-1]["step_time_s"], "loss": history[-1]["loss"], "device": info.device}


def run_ranks(args, job=measure_on_rank) -> dict:
    """Run the probe on --nproc local ranks; the JSON fields of a completed probe. Raises on failure, with the
    failing rank's last error line (an OOM on any rank reads as one)."""
    backend = choose_backend(args.backend, args.nproc, "cpu" if args.device == "cpu" else "cuda")
    with tempfile.TemporaryDirectory(prefix="spbench-distprobe-") as tmp, deepspeed_files() as deepspeed:
        spec = spec_from_args(args, args.nproc, args.sp, deepspeed(args.zero, args.offload) if args.zero else None)
        try:
            with RankPool(args.nproc, backend=backend, timeout=args.timeout) as pool:
                ranks = pool.run(job, spec.train_config(str(Path(tmp) / "run")), args.gpu_mem_gib)
        except RankError as e:
            raise RuntimeError(first_error(e)) from None
    return _figures(args, spec, backend, ranks)


def _figures(args, spec: StepSpec, backend: str, ranks: list[dict]) -> dict:
    peaks = [r["peak_gib"] for r in ranks]
    step_s = ranks[0]["step_s"]
    tokens = args.length * spec.rows * (args.nproc // args.sp)  # every row is full
    known = [p for p in peaks if p is not None]
    return {"status": "ok", "oom": False, "backend": backend, "nproc": args.nproc, "sp": args.sp,
            "method": args.method, "zero": args.zero, "offload": list(args.offload), "steps": args.steps,
            "peak_gib": max(known) if known else None, "rank_peak_gib": peaks,
            "static_gib": max((r["static_gib"] for r in ranks if r["static_gib"] is not None), default=None),
            "gpu_mem_gib": args.gpu_mem_gib, "step_s": step_s, "tokens": tokens, "tokens_per_s": tokens / step_s,
            "rank_tokens": tokens // args.nproc,  # every rank holds an equal share (DP rows × SP shards)
            "loss": ranks[0]["loss"], "features": spec.features.to_json()}


def first_error(err: RankError) -> str:
    """'rank R: <its exception line>' for the lowest rank that raised, else the RankError's first line."""
    if not err.errors:
        return str(err).splitlines()[0]
    rank = min(err.errors)
    lines = [x.strip() for x in err.errors[rank].strip().splitlines() if x.strip()]
    return f"rank {rank}: {lines[-1]}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spbench.memory.distprobe", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, steps=2)
    p.add_argument("--nproc", type=int, required=True, help="ranks (GPUs, or emulated ranks with gloo-cuda)")
    p.add_argument("--sp", type=int, help="sequence-parallel size (default --nproc)")
    p.add_argument("--zero", type=int, choices=(0, 2, 3), default=0, help="DeepSpeed ZeRO stage (0: none)")
    p.add_argument("--offload", default="none", help="none, optimizer, param or optimizer,param (needs --zero)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: gloo on CPU, NCCL with a GPU per rank, else gloo-cuda on one GPU")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the ranks are killed (default 1800)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.sp = args.sp or args.nproc
    args.offload = parse_offload(args.offload)
    if args.nproc < 1 or args.sp < 1 or args.nproc % args.sp:
        p.error(f"--sp {args.sp} must divide --nproc {args.nproc}")
    try:
        check_offload(args.zero, args.offload)
    except ValueError as e:
        p.error(f"--offload {','.join(args.offload)}: {e}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None, job=measure_on_rank) -> int:
    args = parse(argv)
    head = {"schema": PROBE, "model": args.model, "stage": args.stage, "length": args.length}
    out, code = result_line(head, lambda: run_ranks(args, job))
    print(json.dumps(out), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
