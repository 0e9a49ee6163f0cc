"""`python -m spbench.memory.flopsreport`: the FLOP table (counted/ideal per rank, memory/flops.py) over strategies,
lengths and feature sets, and the attention balance over ranks, printed and written as JSON with provenance.

    python -m spbench.memory.flopsreport --model qwen2.5-7b --lengths 32768,131072,1048576 --out reports/flops/flops.json
    python -m spbench.memory.flopsreport --balance --methods ring:8,zigzag:8,hybrid:8 --lengths 32768
    python -m spbench.memory.flopsreport --balance --packed --model tiny --lengths 4096 --methods zigzag:8

Rows (schema spbench.flops/1): kind "flops" — rank 0's `ratio` (counted/ideal), `ratio_vs_early_stop` (against the
ideal less the recompute's early-stop saving), `matmul_ratio`, `attention_ratio`, the counts and the ideal;
kind "balance" — `per_rank` attention FLOPs and `max_over_mean`. Packed rows are documents of random lengths
(1/16 to 1/3 of the row, seeded) packed into rows of `length` tokens; their document split reads the data, so
they run on real tensors: use a small model (attention work per rank depends on the layout, not the width).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.memory import AUTO, DEFAULT_LOSS_CHUNK, MemoryFeatures

from ..common.results import provenance, write_json_atomic
from ..common.schemas import FLOPS as SCHEMA
from .flops import attention_balance, counted_step
from .step import StepSpec

# ------------------------------------------------------------------------------------------------ the command
VARIANTS = {  # name → (tiled_loss_chunk, tiled_mlp_chunks); gradient checkpointing on in all
    "tiled": (DEFAULT_LOSS_CHUNK, AUTO), "mlp-only": (None, AUTO), "loss-only": (DEFAULT_LOSS_CHUNK, None),
    "untiled": (None, None),
}


def _spec_for(model: str, length: int, sp: int, method: str, variant: str, stage: str) -> StepSpec:
    loss, mlp = VARIANTS[variant]
    features = MemoryFeatures(tiled_loss_chunk=loss, tiled_mlp_chunks=mlp)
    return StepSpec(model, stage, length, features, dtype="bfloat16", device="cpu", nproc=sp, sp=sp, method=method)


def ratio_row(model: str, length: int, sp: int, method: str, variant: str, stage: str = "sft") -> dict:
    """One row of the FLOP table: rank 0's counted/ideal for `variant` (VARIANTS) of an SFT/DPO step;
    `ratio_vs_early_stop`: against the ideal less the recompute's early-stop saving (module doc)."""
    t0 = time.perf_counter()
    count = counted_step(_spec_for(model, length, sp, method, variant, stage), 0).to_json()
    count.pop("by_op")
    ideal = count["ideal"]
    return {"kind": "flops", "model": model, "length": length, "sp": sp, "method": method, "variant": variant,
            "stage": stage, **count, "ratio_vs_early_stop": count["total_flops"] / (ideal["total"] - ideal["early_stop_saving"]),
            "count_s": round(time.perf_counter() - t0, 1)}


def packed_documents(path: Path, length: int, seed: int = 0) -> Path:
    """An alpaca .jsonl of documents of length/16 to length/3 characters (the tiny presets' byte tokenizer: one
    token each), enough to pack a few rows of `length` tokens."""
    rng = random.Random(seed)
    docs = [{"instruction": "x" * rng.randint(length // 16, length // 3), "output": "y"} for _ in range(24)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def balance_row(model: str, length: int, sp: int, method: str, packed: bool) -> dict:
    """Attention work max/mean over the SP ranks of one step; `packed`: documents packed into the row (module doc)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = None
        if packed:
            overrides = {"packing": True, "dataset": str(packed_documents(Path(tmp) / "docs.jsonl", length)),
                         "max_samples": None}
        bal = attention_balance(_spec_for(model, length, sp, method, "tiled", "sft"), overrides, fake=not packed)
    return {"kind": "balance", "model": model, "length": length, "sp": sp, "method": method, "packed": packed,
            **bal, "count_s": round(time.perf_counter() - t0, 1)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spbench.memory.flopsreport", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-7b")
    p.add_argument("--lengths", default="32768,131072,1048576", help="tokens per sequence, comma-separated")
    p.add_argument("--methods", default="zigzag:8,hybrid:8,ulysses:4",
                   help="STRATEGY:SP, comma-separated (qwen2.5-7b's 28 heads: ulysses at SP 4, not 8)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    p.add_argument("--balance", action="store_true", help="attention balance over the ranks instead of FLOPs")
    p.add_argument("--packed", action="store_true", help="with --balance: packed synthetic documents (real tensors)")
    p.add_argument("--out", default=None, help="write OUT.json (with provenance); default: print only")
    return p


def _rows(args) -> Iterator[dict]:
    for length in (int(n) for n in args.lengths.split(",")):
        for method, sp in (m.split(":") for m in args.methods.split(",")):
            if args.balance:
                yield balance_row(args.model, length, int(sp), method, args.packed)
                continue
            for variant in args.variants.split(","):
                yield ratio_row(args.model, length, int(sp), method, variant, args.stage)


def _line(r: dict) -> str:
    head = f"{r['method']:8s} sp {r['sp']} {r['length']:>8d}"
    if r["kind"] == "balance":
        return f"{head} {'packed' if r['packed'] else 'unpacked'}  attention max/mean {r['max_over_mean']:.4f}  {r['count_s']} s"
    return (f"{head} {r['variant']:9s} ratio {r['ratio']:.4f} (vs early stop {r['ratio_vs_early_stop']:.4f}; "
            f"matmul {r['matmul_ratio']:.4f}, attention {r['attention_ratio']:.4f})  {r['count_s']} s")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0, rows = time.perf_counter(), []
    for row in _rows(args):
        rows.append(row)
        print(_line(row), flush=True)
    if args.out:
        command = "python -m spbench.memory.flopsreport " + " ".join(argv if argv is not None else sys.argv[1:])
        doc = {"schema": SCHEMA, "rows": rows, "provenance": provenance(command, "fake", 1, 0, time.perf_counter() - t0)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
