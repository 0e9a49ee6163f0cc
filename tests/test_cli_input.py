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


@pytest.mark.parametrize("argv", [
    ["parity", "--stage", "sft", "--out", "BAD"],
    ["maxlen", "--model", "tiny", "--estimate", "--out", "BAD"],
    ["report", "GOLDEN", "--out", "BAD"],
    ["gate", "--baseline", "GOLDEN", "--results", "GOLDEN", "--junit", "BAD/gate.xml"],
    ["train", "BADCFG"],
])
def test_an_unwritable_output_is_one_line_exit_2_before_any_work(tmp_path, capsys, argv):
    from spbench.common.suites import golden

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    bad = str(blocker / "sub")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\noutput_dir: {bad}\n")
    subst = {"BAD": bad, "GOLDEN": str(golden("ci")), "BADCFG": str(cfg), "BAD/gate.xml": bad + "/gate.xml"}
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a writable folder" in err[0], err


def test_a_run_that_dies_leaves_no_stale_provenance(tmp_path, capsys):
    """Provenance is written last: a re-run that fails leaves none of the previous run's beside its partial files."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "provenance.json").write_text("{}")
    cfg = tmp_path / "run.yaml"  # a global batch larger than the data: every rank fails building the trainer
    cfg.write_text(f"model_name_or_path: tiny\ndevice: cpu\nmax_samples: 2\nper_device_train_batch_size: 4\n"
                   f"dtype: float32\noutput_dir: {out}\n")
    assert main(["train", str(cfg), "--nproc", "1"]) == 1
    assert not (out / "provenance.json").exists()
