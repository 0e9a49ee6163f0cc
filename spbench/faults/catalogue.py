"""The fault catalogue: every known SP bug (../shared/FAULTS.md) injected, and the check that catches it.

Injections (faults/variants.py) are active inside the SP ranks only: the SP-off reference always runs the
clean runtime. A fault counts as caught when at least one of its checks fails under injection, and the
catalogue only passes if, in addition, every check passes on the clean runtime. This package depends on the
checks (parity, attention); nothing depends on it.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

import runtime.losses

from ..check.attention import AttnCase, judge_attention, run_on_rank
from ..check.cases import load_suite
from ..check.parity import run_cases
from ..common.errors import RankError
from ..common.jobs import train_on_rank
from ..common.pool import RankPool
from .variants import ORIGINAL_TOKEN_LOGPROBS, inject


def train_with_fault(info, cfg_values: dict, capture_grads: bool = False, on_step=None, fault: str | None = None
                     ) -> dict | None:
    """Rank job: `common.jobs.train_on_rank` with `fault` injected in this rank."""
    with inject(fault, cfg_values):
        return train_on_rank(info, cfg_values, capture_grads, on_step)


def attention_with_fault(info, fault: str | None, cases: list[AttnCase]) -> list:
    """Rank job: `check.attention.run_on_rank` with `fault` (None: none) injected in this rank."""
    with inject(fault, {}):
        return run_on_rank(info, cases)


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
    Fault("F12", "SP silently off", ("parity:sft-zigzag-sp4", "parity:dpo-sigmoid-zigzag-sp4")),  # no loss compared
    Fault("F13", "sequence split twice", ("parity:sft-zigzag-sp4", "parity:sft-ring-sp2")),
    Fault("F14", "tiled-loss gradient factor", ("parity:features-sft-zigzag-sp2",)),
    Fault("F15", "grad norm over-counted for clipping", ("parity:clip-sft-ring-sp2",)),
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
        tiled = runtime.losses.token_logprobs(hidden, head, targets, chunk)  # looked up now: an injection shows
    exact = torch.allclose(tiled, ORIGINAL_TOKEN_LOGPROBS(hidden, head, targets, None), atol=1e-12)
    ok = biggest <= chunk and exact
    return ok, f"largest saved full-vocab tensor: {biggest} rows (limit {chunk}); tiled == untiled: {exact}"


def run_checks(names: list[str], fault: str | None, cases: dict, pools: dict, refs: dict) -> dict[str, tuple[bool, str]]:
    """name → (passed, detail) for the named checks, with `fault` injected in the SP ranks."""
    out: dict[str, tuple[bool, str]] = {}
    parity = [cases[n.split(":", 1)[1]] for n in names if n.startswith("parity:")]
    job = train_on_rank if fault is None else functools.partial(train_with_fault, fault=fault)
    for res in run_cases(parity, log=lambda *_: None, pools=pools, refs=refs, sp_job=job) if parity else []:
        detail = res["error"] or "; ".join(res["failures"][:2]) or f"max loss err {res['metrics']['max_loss_rel_err']:.1e}"
        out[f"parity:{res['name']}"] = (res["passed"], detail)
    attn = [n for n in names if n in ATTENTION_CHECKS]
    if attn:
        try:
            per_rank = pools[4].run(attention_with_fault, fault, [ATTENTION_CHECKS[n] for n in attn])
            for i, n in enumerate(attn):
                r = judge_attention(ATTENTION_CHECKS[n], [x[i] for x in per_rank])
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


