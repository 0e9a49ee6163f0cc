"""`spbench check-attention` end to end: JSON contract, exit codes, one-line input errors."""
import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "spbench", "check-attention", *args],
                          capture_output=True, text=True, timeout=300)


def test_passing_check_ends_with_the_json_line():
    r = run_cli("--method", "zigzag", "--sp", "2", "--heads", "4", "--kv-heads", "2", "--seq", "37",
                "--head-dim", "8", "--docs", "20,17", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["passed"] is True and doc["tolerance"] <= 1e-10
    assert set(doc["max_abs_err"]) == {"out", "lse", "dq", "dk", "dv"}
    assert all(0 <= e <= doc["tolerance"] for e in doc["max_abs_err"].values())


@pytest.mark.parametrize("argv,msg", [
    (["--method", "ulysses", "--sp", "3", "--heads", "4", "--kv-heads", "4"], "hybrid"),
    (["--method", "ring", "--sp", "2", "--heads", "4", "--kv-heads", "3"], "not a multiple of kv_heads"),
    (["--method", "ring", "--sp", "2", "--seq", "10", "--docs", "4,4"], "sum to 8"),
    (["--method", "ring", "--sp", "2", "--dtype", "bfloat16", "--kernel", "cuda-cudnn", "--backend", "gloo"], "needs CUDA"),
])
def test_invalid_combination_exits_2_with_one_line(argv, msg):
    r = run_cli(*argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "spawning" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], lines
