"""Ranks die with their launcher: SIGTERM or SIGKILL to `spbench train` / `spbench parity` (what timeout, Slurm and
CI cancellation send) leaves no rank process behind, training or hanging."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads children from /proc (Linux)")


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _kill_parent_then_ranks_go(argv: list[str], cwd: Path, started, sig: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "spbench", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not started() or len(_children(proc.pid)) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.5)
        ranks = _children(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(ranks), f"rank processes {sorted(_alive(ranks))} outlived their parent ({sig=})"
    finally:
        for pid in _alive(_children(proc.pid)) | {proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_train_ranks_die_with_the_parent(tmp_path, sig):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: tiny\ndataset: synthetic\ncutoff_len: 64\nsequence_parallel_size: 2\n"
                   f"max_steps: 100000\ndtype: float32\ndevice: cpu\noutput_dir: {tmp_path / 'out'}\n")
    metrics = tmp_path / "out" / "metrics.jsonl"
    _kill_parent_then_ranks_go(["train", str(cfg)], tmp_path, lambda: metrics.exists() and metrics.stat().st_size, sig)


def test_parity_ranks_die_with_the_parent(tmp_path):
    _kill_parent_then_ranks_go(["parity", "--out", str(tmp_path / "p")], tmp_path, lambda: True, signal.SIGTERM)
