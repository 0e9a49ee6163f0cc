"""`python -m spbench.distprobe`: the trainer on N ranks at one length (CPU gloo here; GPUs measure memory)."""
import json

import pytest
from rankjobs import oom_on_rank_1

from spbench.common.deepspeed import deepspeed_config
from spbench.common.pool import RankError
from spbench.memory import distprobe
from spbench.memory.distprobe import first_error


def run(capsys, *argv, job=distprobe.measure_on_rank):
    code = distprobe.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--timeout", "240", *argv], job=job)
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ("--stage", "sft", "--length", "200", "--nproc", "2", "--method", "zigzag"),
    ("--stage", "dpo", "--length", "96", "--nproc", "2", "--sp", "1", "--zero", "3", "--offload", "optimizer,param"),
], ids=["sft-zigzag-sp2", "dpo-dp2-zero3-offload"])
def test_trainer_steps_run_on_ranks(capsys, argv):
    code, out = run(capsys, *argv)
    assert code == 0 and out["status"] == "ok" and out["schema"] == "spbench.probe/1", out
    length, nproc = int(argv[3]), 2
    rows = 2 if argv[1] == "dpo" else 1
    dp = nproc // (int(argv[argv.index("--sp") + 1]) if "--sp" in argv else nproc)
    assert out["tokens"] == length * rows * dp and out["tokens_per_s"] == pytest.approx(out["tokens"] / out["step_s"])
    assert out["rank_tokens"] == out["tokens"] // nproc
    assert out["steps"] == 2 and out["rank_peak_gib"] == [None, None] and out["backend"] == "gloo"
    assert out["loss"] == out["loss"]  # finite, not NaN


def test_an_oom_on_any_rank_is_an_oom_probe(capsys):
    code, out = run(capsys, "--length", "64", "--nproc", "2", job=oom_on_rank_1)
    assert code == 0 and out["status"] == "oom" and out["oom"] is True
    assert out["error"].startswith("RuntimeError: rank 1: torch.OutOfMemoryError: CUDA out of memory")


def test_first_error_names_the_lowest_failed_rank():
    err = RankError("ranks 0, 2 failed in job:\n...", {2: "Traceback\nKeyError: 'k'\n",
                                                         0: "Traceback (most recent call last):\n  File x\nValueError: bad\n\n"})
    assert first_error(err) == "rank 0: ValueError: bad"
    assert first_error(RankError("job timed out after 5 s on 2 ranks ([1] did not finish)")).startswith("job timed out")


def test_deepspeed_config_matches_the_setup():
    assert deepspeed_config(2, ())["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}
    ds = deepspeed_config(3, ("optimizer", "param"))
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("argv,msg", [
    (["--nproc", "4", "--sp", "3"], "must divide"),
    (["--nproc", "2", "--offload", "optimizer"], "--offload"),
    (["--nproc", "2", "--zero", "2", "--offload", "param"], "--offload"),
])
def test_bad_flags_exit_2(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        distprobe.parse(["--model", "tiny", "--length", "64", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_example_deepspeed_files_are_what_the_harness_writes():
    import json
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    for name, zero, offload in (("ds_z2.json", 2, ()), ("ds_z3.json", 3, ()), ("ds_z3_offload.json", 3, ("optimizer", "param"))):
        assert json.loads((examples / name).read_text()) == deepspeed_config(zero, offload), name
