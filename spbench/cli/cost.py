"""`spbench cost`: one training step per rank, counted by the code itself on CPU, without a GPU.

For a model, length, SP size and strategy, ONE `Trainer.step` (the step `spbench train` runs) is run as SP rank 0
on fake tensors with a fake process group (nothing is allocated: 7B at millions of tokens runs on a laptop), and
prints: the traced per-rank peak memory beside the memory model's prediction (a ZeRO setup's static terms come from
the model, named in the output; blockwise attention traces rank sp − 1 too and the larger peak counts, its rank shown), FLOPs over the ideal (forward + one recompute + backward), bytes the SP
collectives sent over the analytic minimum (and over minimum + the excess it explains: the ring's final dK/dV hop,
the recompute's attention), and the attention work imbalance max/mean over the SP ranks. `--json` ends stdout with
one JSON line per length (schema spbench.cost/1); `--out FILE` writes them as one JSON document, which `spbench
report` renders as a cost table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from runtime.memory import AUTO, DEFAULT_LOSS_CHUNK, DEFAULT_NORM_CHUNK, MemoryFeatures
from runtime.models import ModelError
from runtime.topology import TopologyError

from ..common.deepspeed import parse_offload
from ..common.errors import UsageError
from ..common.results import provenance, write_json_atomic
from ..common.schemas import COST
from ..common.table import format_table
from ..memory.setup import GPU_KERNELS, MODELLED_KERNELS, SP_METHODS, STAGES, Setup

EPILOG = """examples:
  spbench cost --model qwen2.5-7b --length 1048576 --sp 8                       # hybrid u4×r2 (28 heads), ZeRO-3
  spbench cost --model qwen2.5-7b --length 32768,1048576 --sp 8 --method zigzag --json
  spbench cost --model llama-3.1-8b --length 4194304 --sp 8 --checkpoint-offload --out reports/cost/cost.json
"""


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="preset name or checkpoint dir")
    p.add_argument("--length", required=True, help="tokens per sequence, comma separated (DPO: each of chosen, rejected)")
    p.add_argument("--sp", type=int, default=8, help="SP size (default 8)")
    p.add_argument("--method", choices=SP_METHODS, default="auto",
                   help="SP strategy (default auto: ulysses when the heads split, else hybrid)")
    p.add_argument("--stage", choices=STAGES, default="sft")
    p.add_argument("--gpus", type=int, help="GPUs in the job (default: --sp)")
    p.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU (default 80)")
    p.add_argument("--zero", type=int, choices=[0, 2, 3], default=3, help="DeepSpeed ZeRO stage (default 3)")
    p.add_argument("--offload", default="optimizer,param", help="none, optimizer, param or both (default both)")
    p.add_argument("--no-tiled-loss", action="store_true", help="full-vocabulary logits")
    p.add_argument("--no-tiled-mlp", action="store_true", help="untiled MLP")
    p.add_argument("--no-tiled-norm", action="store_true", help="transformers' RMSNorm (untiled)")
    p.add_argument("--checkpoint-offload", action="store_true", help="checkpointed hidden states in CPU memory")
    p.add_argument("--attention-kernel", choices=MODELLED_KERNELS, default=GPU_KERNELS[0],
                   help="the kernel the model describes (default cuda-cudnn, a GPU's; its own bytes join the trace's "
                        "attention peak); cpu-flash: the trace's own, to check the model against the trace alone")
    p.add_argument("--no-balance", action="store_true", help="skip the per-rank attention balance (SP more steps)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line per length")
    p.add_argument("--out", help="write the results as one JSON document (schema spbench.cost/1 rows)")


def setup_from(args) -> Setup:
    """The memory-model Setup the flags describe; a setup the runtime would refuse is a usage error."""
    features = MemoryFeatures(tiled_loss_chunk=None if args.no_tiled_loss else DEFAULT_LOSS_CHUNK,
                              tiled_mlp_chunks=None if args.no_tiled_mlp else AUTO,
                              tiled_norm_chunk=None if args.no_tiled_norm else DEFAULT_NORM_CHUNK,
                              checkpoint_offload=args.checkpoint_offload)
    try:
        offload = parse_offload(args.offload)
        return Setup(args.model, args.stage, args.gpus or args.sp, args.gpu_mem, args.sp, args.zero,
                     frozenset(offload), features, args.method, attention_kernel=args.attention_kernel)
    except (ValueError, ModelError, TopologyError) as e:
        raise UsageError(str(e)) from None


def lengths_from(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--length {text!r}: give token counts, e.g. 32768,1048576") from None
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--length {text!r}: every length must be >= 1")
    return lengths


def table(rows: list[dict]) -> str:
    head = ["length", "rank tokens", "traced GiB", "peak rank", "model GiB", "model err", "FLOPs/ideal", "bytes/min",
            "bytes/(min+expl.)", "attn max/mean", "wall s"]
    body = []
    for r in rows:
        b, bal = r["bytes"], r.get("attention_balance")
        body.append([f"{r['length']:,}", f"{r['rank_tokens']:,}", f"{r['memory']['traced_gib']:.2f}",
                     str(r["memory"]["rank"]), f"{r['memory']['model_gib']:.2f}", f"{r['memory']['error']:+.2%}", f"{r['flops']['ratio']:.4f}",
                     "-" if b["ratio"] is None else f"{b['ratio']:.4f}",
                     "-" if b["ratio_to_expected"] is None else f"{b['ratio_to_expected']:.4f}",
                     "-" if bal is None else f"{bal['max_over_mean']:.4f}", f"{r['wall_s']:.0f}"])
    return format_table(head, body, right=set(range(len(head))))


def run(args) -> int:
    from ..memory.cost import step_cost
    from ..memory.traced import NotTraceable, spec_for

    setup, lengths = setup_from(args), lengths_from(args.length)
    try:
        spec_for(setup, lengths[0])
    except NotTraceable as e:
        raise UsageError(str(e)) from None
    t0 = time.monotonic()
    rows = []
    for length in lengths:
        print(f"cost: {setup.model} {setup.stage} length {length:,} SP {setup.sp} {setup.sp_method} ...",
              file=sys.stderr, flush=True)
        rows.append(step_cost(setup, length, balance=not args.no_balance))
    s = setup
    print(f"cost of one step on SP rank 0, memory on the rank that peaks ({s.model} {s.stage}, {s.gpus}×{s.gpu_mem_gib:g} GiB, SP {s.sp} {s.sp_method}"
          f"{f' u{s.ulysses}×r{s.sp // s.ulysses}' if s.sp_method == 'hybrid' else ''}, ZeRO {s.zero}, offload "
          f"{','.join(sorted(s.offload)) or 'none'}; traced on fake tensors; model terms used: "
          f"{', '.join(rows[0]['memory']['from_model'])}):")
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"schema": COST, "rows": rows,
                                     "provenance": provenance(" ".join(["spbench", *sys.argv[1:]]), "fake", s.sp, 0,
                                                              wall_time_s=round(time.monotonic() - t0, 1))})
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0
