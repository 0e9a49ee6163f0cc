"""Bad CLI values: one line on stderr, exit 2, before any rank starts and before any file is written."""
from __future__ import annotations

import pytest

from spbench.cli import main


@pytest.mark.parametrize("argv,flag", [
    (["train", "CFG", "--nproc", "0"], "--nproc"),
    (["train", "CFG", "--timeout", "-5"], "--timeout"),
    (["parity", "--timeout", "-5", "--out", "OUT"], "--timeout"),
    (["parity", "--stage", "sft", "--sp", "0", "--out", "OUT"], "--sp"),
    (["parity", "--stage", "sft", "--steps", "0", "--out", "OUT"], "--steps"),
    (["check-attention", "--method", "ring", "--sp", "2", "--timeout", "0"], "--timeout"),
])
def test_non_positive_values_are_one_line_exit_2(tmp_path, capsys, argv, flag):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\noutput_dir: {tmp_path / 'run'}\n")
    argv = [str(cfg) if a == "CFG" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} must be > 0" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
