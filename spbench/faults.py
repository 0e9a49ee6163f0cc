"""`spbench faults`: inject every known SP bug (../shared/FAULTS.md) and show which check catches it.

Each injection is a test-only context manager that swaps ONE runtime function for the
buggy variant the field shipped; the runtime itself carries no fault flags. Injections
are active inside the SP ranks only: the SP-off reference always runs the clean runtime.
A fault counts as caught when at least one of its checks fails under injection, and the
run only passes if, in addition, every check passes on the clean runtime.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

import runtime.data
import runtime.ring
import runtime.train
import runtime.ulysses
from runtime.blockattn import SeqMeta
from runtime.comm import all_reduce_
from runtime.layout import pad_to
from runtime.losses import IGNORE

from .attncheck import AttnCase, compare, run_on_rank
from .errors import UsageError
from .launch import RankError, RankPool
from .parity import load_suite, run_cases
from .results import provenance, write_json_atomic

EPILOG = """examples:
  spbench faults
  spbench faults --only F3,F10 --json
"""


@contextlib.contextmanager
def swapped(owner, name: str, replacement) -> Iterator[None]:
    """Temporarily replace `owner.name` (a module function or class attribute)."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


# ---- the buggy variants -------------------------------------------------------------------------------
def _shard_then_shift(orig):
    """F1: labels shifted after sharding: each shard shifts its own labels, dropping boundary targets."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        plan = plan_for(mb.seq_len)
        labels = torch.cat([torch.full_like(mb.targets[:, :1], IGNORE), mb.targets[:, :-1]], dim=1)  # unshift
        local = plan.shard(pad_to(labels, plan.total_len, 1, IGNORE), sp_rank)
        lb.targets = torch.cat([local[:, 1:], torch.full_like(local[:, :1], IGNORE)], dim=1).to(device)
        return lb
    return shard_batch


def _no_document_mask(orig):
    """F7: packed rows attended as one sequence: attention crosses document boundaries."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        lb.meta = SeqMeta.build(plan_for(mb.seq_len), mb.seq_len, causal=True)
        return lb
    return shard_batch


def _supervised_padding(orig):
    """F8: the padding added for divisibility is supervised (targets padded with the pad id)."""
    def shard_batch(mb, plan_for, sp_rank, device="cpu"):
        lb = orig(mb, plan_for, sp_rank, device)
        plan = plan_for(mb.seq_len)
        lb.targets = plan.shard(pad_to(mb.targets, plan.total_len, 1, 0), sp_rank).to(device)
        return lb
    return shard_batch


def _per_rank_mean(n_terms: int):
    """F2: every rank averages its own tokens, then the per-rank means are averaged."""
    def sft_loss(logp, targets, step_tokens):
        return -(logp.sum()) / max(int((targets != IGNORE).sum()), 1) / n_terms
    return sft_loss


def _zero_over_zero(logp, targets, step_tokens):
    """F5: a shard without supervised tokens computes 0/0."""
    count = (targets != IGNORE).sum()
    return (-(logp.sum()) / count) * count / step_tokens


def _micro_denominator(self, step, stage):
    """F4: normalise by one micro-batch's token count scaled by the micro-batch count."""
    first = self.step_units(step)[: self.per_device]
    if stage == "sft":
        return max(1, sum(u.supervised() for u in first)) * self.grad_accum * self.dp
    return len(set().union(*(u.pairs() for u in first))) * self.grad_accum * self.dp


def _average_grads(orig):
    """F3: gradients averaged over the SP group instead of summed (off by P)."""
    def reduce_grads(self):
        orig(self)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(self.pc.grid.world)
    return reduce_grads


def _tiled_kv(x, u):
    """F6: kv heads tiled (repeat) instead of interleaved: query heads meet another head's K/V."""
    kv = x.shape[1]
    return x if kv >= u else x.repeat(1, u // kv, 1, 1)


def _naive_merge(out, lse, blk_out, blk_lse):
    """F9: merge with raw exp(): overflows for large logits."""
    a, b = torch.exp(lse), torch.exp(blk_lse)
    return (out * a[..., None] + blk_out.to(out.dtype) * b[..., None]) / (a + b)[..., None], torch.log(a + b)


class _AllReduceBoth(torch.autograd.Function):
    """F10: the sequence-sum reduction all-reduces in backward too (gradients × P)."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group = group
        return all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone(), ctx.group), None, None


def _untiled(hidden, lm_head, targets, chunk_tokens=None):
    """F11: full-vocabulary logits for the whole shard, whatever the chunk size."""
    return ORIGINAL_TOKEN_LOGPROBS(hidden, lm_head, targets, None)


ORIGINAL_TOKEN_LOGPROBS = runtime.train.token_logprobs


def _injection(fault: str, cfg: dict) -> contextlib.AbstractContextManager:
    sp = cfg.get("sequence_parallel_size", 1)
    n_terms = sp * cfg.get("gradient_accumulation_steps", 1) * (dist.get_world_size() // sp if dist.is_initialized() else 1)
    table: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "F1": lambda: swapped(runtime.train, "shard_batch", _shard_then_shift(runtime.data.shard_batch)),
        "F2": lambda: swapped(runtime.train, "sft_loss", _per_rank_mean(n_terms)),
        "F3": lambda: swapped(runtime.train.Trainer, "_reduce_grads", _average_grads(runtime.train.Trainer._reduce_grads)),
        "F4": lambda: swapped(runtime.data.StepSchedule, "step_denominator", _micro_denominator),
        "F5": lambda: swapped(runtime.train, "sft_loss", _zero_over_zero),
        "F6": lambda: swapped(runtime.ulysses, "replicate_kv", _tiled_kv),
        "F7": lambda: swapped(runtime.train, "shard_batch", _no_document_mask(runtime.data.shard_batch)),
        "F8": lambda: swapped(runtime.train, "shard_batch", _supervised_padding(runtime.data.shard_batch)),
        "F9": lambda: swapped(runtime.ring, "merge", _naive_merge),
        "F10": lambda: swapped(runtime.train, "sum_shards", lambda x, g, c=None: _AllReduceBoth.apply(x, g, c)),
        "F11": lambda: swapped(runtime.train, "token_logprobs", _untiled),
    }
    return table[fault]()


def inject(fault: str | None, cfg: dict) -> contextlib.AbstractContextManager:
    """Context manager with `fault` injected (a no-op for None)."""
    return contextlib.nullcontext() if fault is None else _injection(fault, cfg)


@dataclass(frozen=True)
class Fault:
    id: str
    title: str
    checks: tuple[str, ...]


FAULTS = (
    Fault("F1", "labels shifted after sharding", ("parity:sft-zigzag-sp4", "parity:sft-ring-sp2")),
    Fault("F2", "per-rank mean loss", ("parity:sft-ring-sp4", "parity:sft-zigzag-sp4")),
    Fault("F3", "gradient off by factor P", ("parity:sft-zigzag-sp4", "parity:dpo-sigmoid-zigzag-sp4")),
    Fault("F4", "grad-accumulation normalisation", ("parity:mix-sft-ring-sp2",)),
    Fault("F5", "zero-token shard → NaN", ("parity:sft-ring-sp4",)),  # contiguous: rank 0 often holds prompt only
    Fault("F6", "GQA kv_heads < P", ("attention:gqa-ulysses", "attention:gqa-hybrid", "parity:sft-ulysses-sp4")),
    Fault("F7", "packing / document masks", ("parity:packed-sft-zigzag-sp4",)),
    Fault("F8", "length not divisible / padding supervised", ("parity:sft-zigzag-sp4",)),
    Fault("F9", "ring merge numerics", ("attention:large-logits",)),
    Fault("F10", "sequence-level losses per shard", ("parity:dpo-sigmoid-zigzag-sp4", "parity:dpo-ipo-zigzag-sp4")),
    Fault("F11", "full-vocabulary logits memory", ("memory:logits",)),
)

ATTENTION_CHECKS = {
    "attention:gqa-ulysses": AttnCase("ulysses", 4, heads=12, kv_heads=2, seq=61, head_dim=8),
    "attention:gqa-hybrid": AttnCase("hybrid", 4, heads=4, kv_heads=1, seq=61, head_dim=8, ulysses=2),
    "attention:large-logits": AttnCase("zigzag", 4, heads=4, kv_heads=4, seq=64, head_dim=8, q_scale=1000.0),
}


def logits_memory_check(chunk: int = 16) -> tuple[bool, str]:
    """F11 on CPU: while the loss runs forward, no tensor saved for backward may hold more than
    `chunk` rows of full-vocabulary values (tiled logits), and tiled equals untiled."""
    torch.manual_seed(0)
    vocab, tokens = 97, 200
    head = torch.nn.Linear(16, vocab, bias=False).double()
    hidden = torch.randn(tokens, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    biggest = 0

    def pack(t):
        nonlocal biggest
        if t.dim() >= 1 and t.shape[-1] == vocab:
            biggest = max(biggest, t.numel() // vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiled = runtime.train.token_logprobs(hidden, head, targets, chunk)
    exact = torch.allclose(tiled, ORIGINAL_TOKEN_LOGPROBS(hidden, head, targets, None), atol=1e-12)
    ok = biggest <= chunk and exact
    return ok, f"largest saved full-vocab tensor: {biggest} rows (limit {chunk}); tiled == untiled: {exact}"


def run_checks(names: list[str], fault: str | None, cases: dict, pools: dict, refs: dict) -> dict[str, tuple[bool, str]]:
    """name → (passed, detail) for the named checks, with `fault` injected in the SP ranks."""
    out: dict[str, tuple[bool, str]] = {}
    parity = [cases[n.split(":", 1)[1]] for n in names if n.startswith("parity:")]
    for res in run_cases(parity, log=lambda *_: None, fault=fault, pools=pools, refs=refs) if parity else []:
        detail = res["error"] or "; ".join(res["failures"][:2]) or f"max loss err {res['metrics']['max_loss_rel_err']:.1e}"
        out[f"parity:{res['name']}"] = (res["passed"], detail)
    attn = [n for n in names if n in ATTENTION_CHECKS]
    if attn:
        try:
            per_rank = pools[4].run(run_on_rank, [ATTENTION_CHECKS[n] for n in attn], fault)
            for i, n in enumerate(attn):
                r = compare(ATTENTION_CHECKS[n], [x[i] for x in per_rank])
                worst = max(r.max_rel_err, key=lambda k: r.max_rel_err[k] if r.max_rel_err[k] == r.max_rel_err[k] else 1e300)
                out[n] = (r.passed, f"{worst} rel err {r.max_rel_err[worst]:.2e} (tol {r.tolerance:.0e})")
        except RankError as e:
            out.update({n: (False, str(e).splitlines()[0]) for n in attn})
    if "memory:logits" in names:
        with inject(fault, {}):
            out["memory:logits"] = logits_memory_check()
    return out


def catalogue(only: list[str] | None = None, log=print) -> dict:
    """Clean run of every check, then each fault with its checks; returns the JSON document."""
    faults = [f for f in FAULTS if not only or f.id in only]
    _, suite_cases = load_suite("faults")
    cases = {c.name: c for c in suite_cases}
    all_checks = sorted({c for f in faults for c in f.checks})
    pools: dict[int, RankPool] = {w: RankPool(w) for w in (2, 4)}
    refs: dict[str, dict] = {}
    try:
        clean = run_checks(all_checks, None, cases, pools, refs)
        for name, (ok, detail) in clean.items():
            log(f"clean  {'pass' if ok else 'FAIL'}  {name}: {detail}")
        rows = []
        for f in faults:
            t0 = time.perf_counter()
            res = run_checks(list(f.checks), f.id, cases, pools, refs)
            caught_by = [n for n, (ok, _) in res.items() if not ok]
            detail = res[caught_by[0]][1] if caught_by else "every check passed"
            rows.append({"id": f.id, "title": f.title, "caught": bool(caught_by), "by": ", ".join(caught_by) or None,
                         "detail": detail, "checks": list(f.checks)})
            log(f"{f.id:<4} {'caught' if caught_by else 'MISSED':<7} {f.title:<42} by {', '.join(caught_by) or '-'}"
                f" ({time.perf_counter() - t0:.1f} s)\n       {detail}")
    finally:
        for p in pools.values():
            p.close()
    clean_ok = all(ok for ok, _ in clean.values())
    return {"faults": rows, "clean_passed": clean_ok, "passed": clean_ok and all(r["caught"] for r in rows),
            "clean": {n: {"passed": ok, "detail": d} for n, (ok, d) in clean.items()}}


def register(subs) -> None:
    p = subs.add_parser("faults", help="inject each known SP bug (FAULTS.md) and show which check catches it",
                        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated fault ids (default: all)")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    p.add_argument("--json", action="store_true", help="print the JSON document as the last stdout line")
    p.set_defaults(func=run)


def run(args) -> int:
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - {f.id for f in FAULTS})
    if unknown:
        raise UsageError(f"unknown fault id(s) {unknown}; known: {', '.join(f.id for f in FAULTS)}")
    doc = catalogue(only)
    n = sum(r["caught"] for r in doc["faults"])
    print(f"faults: {n}/{len(doc['faults'])} caught; clean runtime {'passes' if doc['clean_passed'] else 'FAILS'} every check")
    if args.out:
        write_json_atomic(args.out, {**doc, "provenance": provenance(" ".join(["spbench", *sys.argv[1:]]), "gloo", 4, 0)})
    if args.json:
        print(json.dumps({"faults": doc["faults"], "passed": doc["passed"]}))
    return 0 if doc["passed"] else 1
