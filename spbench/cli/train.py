"""`spbench train CONFIG.yaml [key=value ...] [--nproc N]`: an SFT/DPO run with metrics.jsonl, train_config.json,
provenance.json, checkpoints and the final model in output_dir. LLaMA-Factory configs run as they are (runtime/lf.py says what happens to each of its keys).

Spawns N local ranks (gloo on CPU, NCCL with one GPU per rank), or, under torchrun
(RANK/WORLD_SIZE set by it), runs as one of torchrun's ranks.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import yaml

from runtime.checkpoint import check_layout, read_state, resume_path
from runtime.config import config_fields, load_config
from runtime.records import load_tokenizer
from runtime.render import format_note
from runtime.train import device_type, preflight

from ..common.backend import BACKENDS, choose_backend
from ..common.errors import UsageError, need_positive
from ..common.jobs import train_on_rank
from ..common.pool import RankInfo, RankPool
from ..common.results import append_jsonl, provenance, writable_folder, write_json_atomic

EPILOG = """examples:
  spbench train examples/sft_tiny.yaml --nproc 4
  spbench train lf_config.yaml model_name_or_path=tiny max_steps=10   # overrides, as llamafactory-cli takes them
  torchrun --nnodes 2 --nproc-per-node 8 -m spbench train run.yaml
config keys:
""" + "\n".join(f"  {k:<30} {doc}" for k, doc in config_fields().items())


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config (keys below; LLaMA-Factory configs work too)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (values read as YAML)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to spawn (default: sequence_parallel_size)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: gloo on CPU, NCCL with a GPU per rank, else gloo-cuda (ranks share GPUs)")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="seconds before the ranks are killed")


class MetricsLog:
    """on_step callback of rank 0: append each step to metrics.jsonl and show progress."""

    def __init__(self, out: Path, total: int | None):
        self.path, self.total = out / "metrics.jsonl", total
        self.tokens, self.seconds = 0, 0.0  # supervised tokens and step time so far (rank start-up excluded)
        self.tty = sys.stderr.isatty()

    def __call__(self, m: dict) -> None:
        append_jsonl(self.path, m)
        if "eval_loss" in m:  # an evaluation after step m["step"]: always shown
            shown = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("eval_") and isinstance(v, float))
            print(("\n" if self.tty else "") + f"eval after step {m['step'] + 1}  {shown}", file=sys.stderr, flush=True)
            return
        self.tokens += m["tokens"] or 0
        self.seconds += m["step_time_s"]
        rate = self.tokens / max(self.seconds, 1e-9)
        of = f"/{self.total}" if self.total else ""
        line = f"step {m['step'] + 1}{of}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3g}  {rate:,.0f} tok/s"
        if self.tty or (m["step"] + 1) % 10 == 0 or m["step"] + 1 == self.total:  # quiet when not a TTY
            print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)


def parse_overrides(items: list[str]) -> dict:
    """["key=value", ...] → {key: value}, each value read as YAML (so 5e-6 is a number and true a bool)."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"override {item!r} is not key=value (e.g. max_steps=10)")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UsageError(f"override {item!r}: the value is not valid YAML") from None
    return out


def keep_metrics_before(path: Path, steps_done: int) -> None:
    """metrics.jsonl with only the records of steps before `steps_done` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if steps_done and line.strip() and json.loads(line)["step"] < steps_done]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def run(args) -> int:
    need_positive(nproc=args.nproc, timeout=args.timeout)
    notes: list[str] = []
    cfg = load_config(args.config, parse_overrides(args.overrides), notes)
    resume = resume_path(cfg.resume_from_checkpoint, cfg.output_dir)  # one line, before any rank, if unusable
    if resume is not None and "RANK" not in os.environ:
        check_layout(read_state(resume), cfg, args.nproc or cfg.sequence_parallel_size, resume)
    if "RANK" not in os.environ:
        preflight(cfg, args.nproc or cfg.sequence_parallel_size)
        notes.append(format_note(cfg.template, load_tokenizer(cfg.model_name_or_path)))
    out = writable_folder(cfg.output_dir, "output_dir")
    (out / "provenance.json").unlink(missing_ok=True)  # provenance is written last: present means complete
    keep_metrics_before(out / "metrics.jsonl", read_state(resume)["steps_done"] if resume else 0)
    write_json_atomic(out / "train_config.json", cfg.to_dict())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        return _torchrun(cfg, out, args)
    nproc = args.nproc or cfg.sequence_parallel_size
    backend = choose_backend(args.backend, nproc, device_type(cfg))
    for note in notes:  # after every check: bad input stays one line
        print(f"note: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    with RankPool(nproc, backend=backend, timeout=args.timeout, collective_timeout=cfg.ddp_timeout) as pool:
        pool.run(train_on_rank, cfg.to_dict(), False, MetricsLog(out, cfg.max_steps), True)
    print(file=sys.stderr)
    write_json_atomic(out / "provenance.json", provenance(" ".join(["spbench", *sys.argv[1:]]), backend, nproc, cfg.seed,
                                                          time.perf_counter() - t0))
    saved = "" if cfg.save_strategy == "no" else f", the model in {out}"
    print(f"train: done; {out / 'metrics.jsonl'}{saved}")
    return 0


def _torchrun(cfg, out: Path, args) -> int:
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.ddp_timeout))
    info = RankInfo(dist.get_rank(), dist.get_world_size(), backend, "cuda" if backend == "nccl" else "cpu")
    t0 = time.perf_counter()
    train_on_rank(info, cfg.to_dict(), False, MetricsLog(out, cfg.max_steps), True)
    if info.rank == 0:
        write_json_atomic(out / "provenance.json", provenance(" ".join(sys.argv), backend, info.world, cfg.seed,
                                                              time.perf_counter() - t0))
    dist.destroy_process_group()
    return 0
