"""Check an SP attention strategy against a dense single-process oracle (forward and backward).

Every rank regenerates the same full random q, k, v, dout from the case's seed, takes its
shard (runtime.layout), runs the strategy forward and backward, and returns its pieces;
the parent reassembles them and compares with `oracle`, plain softmax attention with an
explicit mask under torch autograd, in float64 on CPU (independent of runtime's kernels).

Tolerances: check/tolerances.py ATTENTION (error = max |sp − oracle| / max(1, max |oracle|), per quantity).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from runtime.attention import SPAttention, resolve_ulysses, shard_plan
from runtime.attention.blockattn import SeqMeta
from runtime.attention.kernels import select_kernel
from runtime.config import DTYPES
from runtime.layout import pad_to
from runtime.topology import build_parallel_context

from .tolerances import ATTENTION

QUANTITIES = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class AttnCase:
    """One attention check: strategy, sizes, dtype, mask."""

    method: str
    sp: int
    heads: int = 4
    kv_heads: int = 4
    seq: int = 64
    head_dim: int = 16
    dtype: str = "float64"
    causal: bool = True
    docs: tuple[int, ...] = ()  # packed document lengths summing to seq; () = one document
    ulysses: int | str = "auto"
    kernel: str = "auto"
    batch: int = 1
    seed: int = 0
    q_scale: float = 1.0  # multiplies q: 1000 gives logits far beyond exp()'s float64 range (F9)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.docs and sum(self.docs) != self.seq:
            raise ValueError(f"document lengths {self.docs} sum to {sum(self.docs)}, not seq={self.seq}")
        if min(self.sp, self.heads, self.kv_heads, self.seq, self.head_dim, self.batch) < 1:
            raise ValueError("sp, heads, kv_heads, seq, head_dim and batch must all be ≥ 1")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads({self.heads}) is not a multiple of kv_heads({self.kv_heads}); "
                             "each kv head serves a whole group of query heads")

    def doc_ids(self) -> torch.Tensor | None:
        if not self.docs:
            return None
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(self.docs)])
        return ids.expand(self.batch, -1).clone()


def make_inputs(case: AttnCase) -> dict[str, torch.Tensor]:
    """Full-sequence q, k, v, dout (deterministic from case.seed), rounded to case.dtype, held in float64."""
    g = torch.Generator().manual_seed(case.seed)
    b, h, kv, n, d = case.batch, case.heads, case.kv_heads, case.seq, case.head_dim
    t = {
        "q": torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * case.q_scale,
        "k": torch.randn(b, kv, n, d, generator=g, dtype=torch.float64),
        "v": torch.randn(b, kv, n, d, generator=g, dtype=torch.float64),
        "dout": torch.randn(b, h, n, d, generator=g, dtype=torch.float64),
    }
    return {k: x.to(DTYPES[case.dtype]).double() for k, x in t.items()}


def oracle(case: AttnCase, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense float64 attention with autograd: out, lse, dq, dk, dv over the full sequence."""
    q, k, v = (inputs[x].clone().requires_grad_(True) for x in ("q", "k", "v"))
    rep = case.heads // case.kv_heads
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(case.head_dim)
    n = case.seq
    allowed = torch.ones(n, n, dtype=torch.bool)
    if case.causal:
        allowed = allowed.tril()
    docs = case.doc_ids()
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    s = s.masked_fill(~allowed.reshape(-1, 1, n, n), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v.repeat_interleave(rep, 1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), inputs["dout"])
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def run_on_rank(info, cases: list[AttnCase]) -> list[dict[str, torch.Tensor] | None]:
    """Rank job: forward + backward of each case; returns this rank's shards (None off SP-group 0)."""
    contexts: dict[tuple[int, int], object] = {}
    try:
        return [_run_case(info, case, contexts) for case in cases]
    finally:
        for pc in contexts.values():
            pc.destroy()


def _run_case(info, case: AttnCase, contexts: dict) -> dict[str, torch.Tensor] | None:
    u = resolve_ulysses(case.method, case.sp, case.heads, case.kv_heads, case.ulysses)
    if (case.sp, u) not in contexts:  # group creation is collective: same order on every rank
        contexts[(case.sp, u)] = build_parallel_context(case.sp, u)
    pc = contexts[(case.sp, u)]
    dtype = DTYPES[case.dtype]
    plan = shard_plan(case.method, case.seq, case.sp, u)
    meta = SeqMeta.build(plan, case.seq, case.causal, case.doc_ids())
    full = {k: x.to(dtype) for k, x in make_inputs(case).items()}
    local = {k: plan.shard(pad_to(x, plan.total_len, 2, 0.0), pc.sp_rank, dim=2).to(info.device) for k, x in full.items()}
    q, k, v = (local[x].requires_grad_(True) for x in ("q", "k", "v"))
    attn = SPAttention(case.method, pc, select_kernel(case.kernel, q.device, dtype))
    out, lse = attn(q, k, v, meta, 1 / math.sqrt(case.head_dim), return_lse=True)
    out.backward(local["dout"])
    pieces = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    mine = {k: x.detach().cpu() for k, x in pieces.items()}
    return {**mine, "kernel": attn.kernel.name} if pc.dp_rank == 0 else None


@dataclass
class AttnResult:
    case: AttnCase
    passed: bool
    tolerance: float
    max_abs_err: dict[str, float] = field(default_factory=dict)
    max_rel_err: dict[str, float] = field(default_factory=dict)
    kernel: str = ""

    def to_json(self) -> dict:
        return {**asdict(self.case), "passed": self.passed, "max_abs_err": self.max_abs_err,
                "max_rel_err": self.max_rel_err, "tolerance": self.tolerance, "kernel": self.kernel}


def judge_attention(case: AttnCase, per_rank: list[dict[str, torch.Tensor] | None]) -> AttnResult:
    """Reassemble the SP group's shards and compare each quantity with the oracle."""
    u = resolve_ulysses(case.method, case.sp, case.heads, case.kv_heads, case.ulysses)
    plan = shard_plan(case.method, case.seq, case.sp, u)
    ref = oracle(case, make_inputs(case))
    tol = ATTENTION[case.dtype]
    shards = per_rank[: case.sp]
    res = AttnResult(case, True, tol, kernel=shards[0]["kernel"])
    for name in QUANTITIES:
        dim = 2
        got = plan.unshard([s[name].double() for s in shards], dim=dim).narrow(dim, 0, case.seq)
        err = (got - ref[name]).abs().max().item()
        res.max_abs_err[name] = err
        res.max_rel_err[name] = err / max(1.0, ref[name].abs().max().item())
        if not res.max_rel_err[name] <= tol:  # NaN fails too
            res.passed = False
    return res
