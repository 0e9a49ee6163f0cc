"""Local rank processes: a reusable pool of gloo (or NCCL) ranks with timeouts.

Process start plus `import transformers` costs ~2 s per rank on the CI box, so a pool is
spawned once per world size and runs many jobs: ``pool.run(fn, *args)`` calls
``fn(pc_rank_info, *args)`` on every rank and returns the per-rank results. A rank that
raises, dies or outlives the timeout ends the job with a `RankError` naming the rank
and carrying its traceback; the pool is then torn down (every process killed) and
restarted on the next call, so one bad job never hangs the others.
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from .errors import RankError, UsageError

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass(frozen=True)
class RankInfo:
    """What a job function learns about its process."""

    rank: int
    world: int
    backend: str
    device: str  # "cpu" or "cuda:N"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent: int, period: float = 0.5) -> None:
    """End this process when `parent` (the pid that spawned it) is gone: SIGTERM or SIGKILL to a launcher
    (timeout, Slurm, CI cancellation) must not leave ranks training or hanging. Linux's parent-death signal
    covers a killed parent at once; a watchdog thread covers the rest (re-parenting is seen as a new ppid)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _worker(rank: int, world: int, port: int, backend: str, inbox, outbox, threads: int, parent: int,
            collective_timeout: float) -> None:
    import torch.distributed as dist

    die_with_parent(parent)
    torch.set_num_threads(threads)
    # What torchrun would export; DeepSpeed reads these.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cpu"
    if backend in ("nccl", "gloo-cuda"):
        local = rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    pg_backend = "nccl" if backend == "nccl" else "gloo"
    dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=collective_timeout))
    info = RankInfo(rank, world, backend, device)
    outbox.put((rank, True, "ready"))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args = job
        try:
            outbox.put((rank, True, fn(info, *args)))
        except BaseException:  # report every failure to the parent, then keep serving
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world` local ranks that run jobs until closed (use as a context manager)."""

    def __init__(self, world: int, backend: str = "gloo", timeout: float = 300.0, threads: int | None = None,
                 startup_timeout: float = 300.0, collective_timeout: float = 300.0):
        if world < 1 or not timeout > 0 or not startup_timeout > 0:
            raise UsageError(f"a rank pool needs world >= 1 and timeouts > 0 s, got world {world}, timeout {timeout:g} s")
        self.world, self.backend, self.timeout, self.startup_timeout = world, backend, timeout, startup_timeout
        self.collective_timeout = collective_timeout  # how long a collective waits for the other ranks
        self.threads = threads or max(1, (os.cpu_count() or 1) // world)
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, self.world, port, self.backend, self._inboxes[r], self._outbox, self.threads, os.getpid(),
                                  self.collective_timeout))
            for r in range(self.world)
        ]
        for p in self._procs:
            p.start()
        # Start-up (spawn, imports, rendezvous) does not count against a job's timeout.
        ready, deadline = 0, time.monotonic() + self.startup_timeout
        while ready < self.world:
            try:
                self._outbox.get(timeout=0.5)
                ready += 1
            except queue.Empty:
                died = any(p.exitcode is not None for p in self._procs)
                if died or time.monotonic() > deadline:
                    why = "" if died else f" (not ready after {self.startup_timeout:.0f} s)"
                    raise RankError(self._failure_report("start-up", {}, grace=0.0) + why)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """fn(RankInfo, *args) on every rank → [result of rank 0, rank 1, ...]."""
        if not self._procs:
            self._start()
        for box in self._inboxes:
            box.put((fn, args))
        results: dict[int, Any] = {}
        name = getattr(fn, "__name__", type(fn).__name__)  # a functools.partial has none
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(results) < self.world:
            try:
                rank, ok, value = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if any(p.exitcode is not None for p in self._procs):
                    errors: dict[int, str] = {}
                    raise RankError(self._failure_report(name, errors), errors)
                if time.monotonic() > deadline:
                    self.close(kill=True)
                    raise RankError(f"{name} timed out after {timeout or self.timeout:.0f} s on {self.world} ranks "
                                    f"({sorted(set(range(self.world)) - set(results))} did not finish)")
                continue
            if not ok:
                errors = {rank: value}
                raise RankError(self._failure_report(name, errors), errors)
            results[rank] = value
        return [results[r] for r in range(self.world)]

    def _failure_report(self, job: str, errors: dict[int, str], grace: float = 2.0) -> str:
        """Collect the other ranks' errors into `errors` for a moment (a failure cascades through collectives),
        kill the pool, and describe every failed rank; the first line names them all."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                rank, ok, value = self._outbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not ok:
                errors[rank] = value
        dead = {r: p.exitcode for r, p in enumerate(self._procs) if p.exitcode is not None}
        self.close(kill=True)
        head = [f"rank {r} died (exit code {code}) during {job}" for r, code in dead.items()]
        if errors:
            head.append(f"rank{'s' if len(errors) > 1 else ''} {', '.join(map(str, sorted(errors)))} failed in {job}")
        body = "".join(f"\n--- rank {r}:\n{errors[r]}" for r in sorted(errors))
        return "; ".join(head) + ":" + body

    def close(self, kill: bool = False) -> None:
        if not kill:
            for box in self._inboxes if self._procs else []:
                box.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
