"""`spbench check-attention`: one SP strategy on N local ranks vs the dense float64 oracle."""
from __future__ import annotations

import argparse
import json

import torch

from runtime.attention import METHODS, resolve_ulysses
from runtime.attention.kernels import KERNELS, select_kernel
from runtime.config import DTYPES

from ..check.attention import AttnCase, judge_attention, run_on_rank
from ..common.backend import BACKENDS, choose_backend, rank_device
from ..common.errors import UsageError, need_positive
from ..common.pool import RankPool

EPILOG = """examples:
  spbench check-attention --method zigzag --sp 4 --heads 12 --kv-heads 2 --seq 1001
  spbench check-attention --method hybrid --sp 8 --ulysses 2 --heads 28 --kv-heads 4 --seq 4096 --dtype bfloat16 --json
  spbench check-attention --method ulysses --sp 2 --heads 4 --kv-heads 4 --seq 300 --no-causal
"""


def add_arguments(p) -> None:
    p.add_argument("--method", required=True, choices=METHODS, help="SP strategy")
    p.add_argument("--sp", type=int, required=True, help="number of local ranks (SP size)")
    p.add_argument("--ulysses", default="auto", help="hybrid only: Ulysses degree, or 'auto' (default)")
    p.add_argument("--heads", type=int, default=12, help="query heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--seq", type=int, default=1000, help="sequence length; need not divide anything (default 1000)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", default="float64", choices=list(DTYPES), help="compute dtype (default float64)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal mask (default on)")
    p.add_argument("--docs", default="", help="packed document lengths, comma separated, summing to --seq")
    p.add_argument("--kernel", default="auto", choices=["auto", *KERNELS], help="local attention kernel (default auto)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: gloo without CUDA, NCCL with a CUDA GPU per rank, else gloo-cuda (ranks share GPUs)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the ranks are killed (default 600)")
    p.add_argument("--json", action="store_true", help="print one JSON line as the last line of stdout")


def _case(args) -> AttnCase:
    try:
        docs = tuple(int(x) for x in args.docs.split(",")) if args.docs else ()
        ulysses = args.ulysses if args.ulysses == "auto" else int(args.ulysses)
        case = AttnCase(args.method, args.sp, args.heads, args.kv_heads, args.seq, args.head_dim, args.dtype,
                        args.causal, docs, ulysses, args.kernel, args.batch, args.seed)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    resolve_ulysses(case.method, case.sp, case.heads, case.kv_heads, case.ulysses)  # TopologyError → one line
    return case


def run(args) -> int:
    need_positive(timeout=args.timeout)
    case = _case(args)
    backend = choose_backend(args.backend, case.sp)
    select_kernel(case.kernel, torch.device(rank_device(backend)), DTYPES[case.dtype])  # KernelError → one line
    print(f"check-attention: {case.method} sp={case.sp} heads={case.heads}/{case.kv_heads} seq={case.seq} "
          f"dtype={case.dtype} causal={case.causal} backend={backend}: spawning {case.sp} ranks ...", flush=True)
    with RankPool(case.sp, backend=backend, timeout=args.timeout) as pool:
        per_rank = pool.run(run_on_rank, [case])
    res = judge_attention(case, [r[0] for r in per_rank])
    print(f"{'quantity':<9}{'max abs err':>14}{'rel err':>12}   tolerance {res.tolerance:.0e} (kernel {res.kernel})")
    for name, err in res.max_abs_err.items():
        print(f"{name:<9}{err:>14.3e}{res.max_rel_err[name]:>12.3e}")
    print("PASSED" if res.passed else "FAILED")
    if args.json:
        print(json.dumps(res.to_json()))
    return 0 if res.passed else 1
