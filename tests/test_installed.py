"""spbench as a user gets it: installed from the package (suites, presets and DeepSpeed configs inside it), run
from a folder outside the checkout; and default outputs that leave a checkout's `git status` as it was."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ZERO_CASE = "zero3-offload-sft-ring-sp2"  # needs the DeepSpeed config the harness writes itself


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built and installed (no dependencies: they are this environment's) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src") / "spbench"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".nox", "out", "*.egg-info", "build", "reports"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                        str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return target


def _spbench(site: Path, cwd: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, spbench; assert spbench.__file__.startswith(sys.argv[1]), spbench.__file__\n"
            "from spbench.cli import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, str(site), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_installed_package_lists_and_runs_the_shipped_suite_from_anywhere(installed, tmp_path):
    listed = _spbench(installed, tmp_path, "parity", "--list")
    assert listed.returncode == 0 and ZERO_CASE in listed.stdout, listed.stderr[-2000:]
    run = _spbench(installed, tmp_path, "parity", "--case", f"{ZERO_CASE},sft-ring-sp2", "--out", "res")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "2/2 cases passed" in run.stdout and (tmp_path / "res" / "ci.json").is_file()
    maxlen = _spbench(installed, tmp_path, "maxlen", "--suite", "maxlen-qwen2.5", "--model", "qwen2.5-0.5b",
                      "--estimate")
    assert maxlen.returncode == 0 and (tmp_path / "out" / "maxlen" / "maxlen.json").is_file(), maxlen.stderr[-2000:]


def _status() -> str | None:
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    except OSError:
        return None
    return r.stdout if r.returncode == 0 else None


def test_default_outputs_leave_the_checkout_clean():
    before = _status()
    if before is None:
        pytest.skip("not a git checkout")
    for argv in (["parity", "--stage", "sft", "--method", "ring", "--sp", "2", "--steps", "1"],
                 ["maxlen", "--model", "tiny", "--estimate"]):
        r = subprocess.run([sys.executable, "-m", "spbench", *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert _status() == before
