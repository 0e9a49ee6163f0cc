"""`spbench maxlen`: the OOM-safe search (simulated GPU), probe records and resume, the estimate CLI path."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.memory import MemoryFeatures
from spbench.cli import maxlen
from spbench.common.errors import UsageError
from spbench.common.schemas import MAXLEN_PROBE
from spbench.memory import model as memmodel
from spbench.memory.maxlen import Target, estimate_row, format_table
from spbench.memory.probe import parser as probe_parser
from spbench.memory.probe import run_probe
from spbench.memory.search import SubprocessProbe, search_max_len
from spbench.memory.setup import Setup
from spbench.memory.step import StepSpec, features_from_args

SUITE = Path(__file__).resolve().parents[1] / "spbench" / "suites" / "maxlen-qwen2.5.toml"


def _target(model, stage, gpus, mem, sp, zero, offload, features, variant="ours", method="auto") -> Target:
    return Target(variant, Setup(model, stage, gpus, mem, sp, zero, frozenset(offload), features, method))


pytestmark = pytest.mark.usefixtures("one_thread")


def H200():
    return 1, 139.0


def simulated_gpu(threshold: int, calls: list | None = None, flaky: dict | None = None):
    """A probe that OOMs above `threshold` tokens; `flaky` maps lengths to forced statuses."""

    def probe(length: int) -> dict:
        if calls is not None:
            calls.append(length)
        status = (flaky or {}).get(length) or ("ok" if length <= threshold else "oom")
        return {"status": status, "oom": status == "oom", "peak_gib": 100.0 * length / threshold,
                "tokens_per_s": 1000.0}

    return probe


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spbench maxlen")
    maxlen.add_arguments(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- search
@settings(max_examples=150, deadline=None)
@given(threshold=st.integers(1, 3_000_000), start=st.integers(1, 4_000_000), res=st.sampled_from([1, 512, 1024, 4096]))
def test_search_finds_threshold_within_resolution(threshold, start, res):
    calls = []
    out = search_max_len(simulated_gpu(threshold, calls), start, res, cap=1 << 23)
    assert out.max_len == threshold // res * res
    assert out.failed_above is not None and out.failed_above - out.max_len <= res
    assert len(calls) == len(set(calls))  # never the same length twice
    assert len(calls) <= 80


def test_search_worked_example_and_bracketing():
    calls = []
    out = search_max_len(simulated_gpu(50_000, calls), 40_960, 1024)
    assert calls[:2] == [40_960, 61_440] and out.max_len == 49_152
    assert out.best["status"] == "ok" and out.best["peak_gib"] < 100
    calls.clear()
    out = search_max_len(simulated_gpu(50_000, calls), 400_000, 1024)  # prediction far too high: shrink
    assert out.max_len == 49_152 and calls[0] == 399_360 and all(c % 1024 == 0 for c in calls)


def test_search_nothing_fits_and_cap_reached():
    assert search_max_len(simulated_gpu(500), 8192, 1024).max_len == 0
    out = search_max_len(simulated_gpu(10**9), 8192, 1024, cap=65_536)
    assert out.max_len == 65_536 and out.failed_above is None


def test_timeouts_and_crashes_are_failed_probes_and_the_search_goes_on():
    calls = []
    flaky = {61_440: "timeout", 46_080: "error"}  # a hang above and a crash below the true threshold
    out = search_max_len(simulated_gpu(50_000, calls, flaky), 40_960, 1024)
    statuses = [p["status"] for p in out.probes]
    assert "timeout" in statuses and "error" in statuses
    assert out.max_len == 45_056  # conservative: the crash at 46,080 counts as a failure


def test_subprocess_probe_ok_oom_timeout_crash(tmp_path):
    fake = ("import sys, json, time\n"
            "L = int(sys.argv[sys.argv.index('--length') + 1])\n"
            "if L == 3: time.sleep(30)\n"
            "if L == 4: sys.exit('boom: segfault-like crash')\n"
            "print('log line')\n"
            "print(json.dumps({'status': 'ok' if L < 2 else 'oom', 'oom': L >= 2, 'peak_gib': L}))\n")
    case = _target("tiny", "sft", 1, 80.0, 1, 0, (), MemoryFeatures())
    probe = SubprocessProbe(case, timeout_s=2, command=[sys.executable, "-c", fake])
    assert probe(1)["status"] == "ok" and probe(1)["peak_gib"] == 1
    assert probe(2)["status"] == "oom"
    assert probe(3)["status"] == "timeout"
    crash = probe(4)
    assert crash["status"] == "error" and "boom" in crash["error"]


@pytest.mark.parametrize("features", [MemoryFeatures(), MemoryFeatures.plain(), MemoryFeatures(checkpoint_offload=True),
                                      MemoryFeatures(tiled_loss_chunk=77, tiled_mlp_chunks=5,
                                                     gradient_checkpointing=False)])
def test_probe_argv_round_trips_features(features):
    case = _target("qwen2.5-7b", "dpo", 1, 80.0, 1, 0, (), features)
    argv = SubprocessProbe(case, 10).argv(4096)
    args = probe_parser().parse_args(argv[3:])
    assert features_from_args(args) == features and args.length == 4096 and args.stage == "dpo"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_probe_step_runs_on_cpu(stage):
    spec = StepSpec("tiny", stage, 96, MemoryFeatures(tiled_loss_chunk=32, checkpoint_offload=True),
                    dtype="float32", device="cpu")
    out = run_probe(spec)
    assert out["status"] == "ok" and out["tokens"] == spec.rows * 96 and out["peak_gib"] is None
    assert torch.isfinite(torch.tensor(out["loss"])) and out["tokens_per_s"] > 0
    h, layers = 64, 2  # tiny: every layer input went to CPU
    assert out["offloaded_tensors"] >= layers and out["offloaded_gib"] * 2**30 >= layers * spec.rows * 96 * h * 4



@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_probe_attention_runtime_and_sdpa_agree(stage):
    """Same weights and tokens: the runtime's attention (SP 1) gives transformers' SDPA loss, over two steps."""
    losses = {}
    for attention in ("runtime", "sdpa"):
        spec = StepSpec("tiny", stage, 80, MemoryFeatures(tiled_loss_chunk=32), attention=attention, steps=2,
                        dtype="float64", device="cpu")
        out = run_probe(spec)
        assert out["steps"] == 2 and out["attention"] == attention
        losses[attention] = out["loss"]
    assert losses["runtime"] == pytest.approx(losses["sdpa"], rel=1e-10, abs=0)


# ---------------------------------------------------------------------------------------- log + resume
MEASURE = ["--model", "qwen2.5-0.5b", "--gpus", "1", "--zero", "0", "--offload", "none", "--gpu-mem", "139"]


def test_measured_run_logs_every_probe_and_resume_skips_them(tmp_path, capsys):
    out_dir = tmp_path / "run"
    threshold = 70_000
    # uninterrupted reference
    full_calls = []
    maxlen.run(_parse([*MEASURE, "--out", str(tmp_path / "ref"), "--json"]),
               probe_factory=lambda case, how: simulated_gpu(threshold, full_calls), gpus=H200)
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ref["rows"][0]["source"] == "measured" and ref["rows"][0]["max_len"] == threshold // 1024 * 1024

    # interrupted after 3 probes: every finished probe is already on disk
    done = []

    def dying(case, how):
        inner = simulated_gpu(threshold, done)

        def probe(length):
            if len(done) == 3:
                raise KeyboardInterrupt
            return inner(length)
        return probe

    with pytest.raises(KeyboardInterrupt):
        maxlen.run(_parse([*MEASURE, "--out", str(out_dir)]), probe_factory=dying, gpus=H200)
    lines = (out_dir / "probes.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(l)["schema"] == MAXLEN_PROBE for l in lines)
    with open(out_dir / "probes.jsonl", "a") as f:
        f.write('{"torn line')  # a crash mid-write must not break resume

    resumed = []
    maxlen.run(_parse([*MEASURE, "--out", str(out_dir), "--resume", "--json"]),
               probe_factory=lambda case, how: simulated_gpu(threshold, resumed), gpus=H200)
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rows"][0]["max_len"] == ref["rows"][0]["max_len"]
    assert not set(resumed) & set(done) and len(resumed) + 3 == len(full_calls)
    assert json.loads((out_dir / "maxlen.json").read_text())["rows"] == got["rows"]
    records = [json.loads(l) for l in (out_dir / "probes.jsonl").read_text().splitlines() if l.endswith("}")]
    assert {r["length"] for r in records} == set(full_calls)
    assert all(r["predicted_gib"] > 0 and "time" in r for r in records)


def test_a_setup_needing_more_gpus_is_estimated_unless_emulated(tmp_path, capsys):
    calls = []
    maxlen.run(_parse(["--model", "qwen2.5-7b", "--out", str(tmp_path), "--json"]),
               probe_factory=lambda case, how: simulated_gpu(1, calls), gpus=H200)
    captured = capsys.readouterr()
    row = json.loads(captured.out.strip().splitlines()[-1])["rows"][0]
    assert row["source"] == "estimated" and not calls and "8 GPUs needed, this machine has 1" in captured.err


@pytest.mark.parametrize("gpus_here,flags,how", [
    ((8, 80.0), [], "nccl"),  # a GPU per rank
    ((1, 139.0), ["--emulate", "--gpus", "4", "--gpu-mem", "34"], "gloo-cuda"),  # 4 ranks share one H200
    ((1, 139.0), ["--gpus", "1", "--zero", "0", "--offload", "none"], "single"),
    ((1, 139.0), ["--gpus", "1", "--zero", "3", "--offload", "optimizer"], "nccl"),  # DeepSpeed: the trainer
])
def test_each_setup_is_measured_the_way_the_machine_can(tmp_path, capsys, gpus_here, flags, how):
    seen = []
    maxlen.run(_parse(["--model", "qwen2.5-0.5b", *flags, "--out", str(tmp_path), "--json"]),
               probe_factory=lambda case, b: seen.append(b) or simulated_gpu(50_000), gpus=lambda: gpus_here)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert seen == [how] and row["source"] == "measured" and row["probe_backend"] == how
    assert row["emulated"] == (how == "gloo-cuda") and row["max_len"] == 50_000 // 1024 * 1024


def test_emulated_ranks_must_fit_on_the_card(tmp_path):
    with pytest.raises(UsageError, match="give --gpu-mem 34.8 or less"):
        maxlen.run(_parse(["--model", "qwen2.5-0.5b", "--emulate", "--gpus", "4", "--gpu-mem", "80",
                           "--out", str(tmp_path)]), probe_factory=lambda case, b: simulated_gpu(1), gpus=H200)
    assert not (tmp_path / "probes.jsonl").exists()


@pytest.mark.parametrize("how,module", [("single", "spbench.memory.probe"),
                                        ("nccl", "spbench.memory.distprobe"),
                                        ("gloo-cuda", "spbench.memory.distprobe")])
def test_subprocess_probe_argv_parses_in_its_module(how, module):
    from spbench.memory import distprobe

    case = _target("qwen2.5-7b", "dpo", 8, 80.0, 4, 3, ("optimizer", "param"), MemoryFeatures(), "ours", "ring")
    argv = SubprocessProbe(case, 600, backend=how).argv(8192)
    assert argv[1:3] == ["-m", module]
    if how == "single":
        return
    args = distprobe.parse(argv[3:])
    assert (args.nproc, args.sp, args.method, args.zero, args.offload, args.backend) == \
        (8, 4, "ring", 3, ("optimizer", "param"), how)
    assert args.gpu_mem_gib == 80.0 and args.timeout == 600 and args.stage == "dpo" and args.length == 8192


# ----------------------------------------------------------------------------------------- estimate CLI
def test_estimate_end_to_end_json(tmp_path, capsys):
    rc = maxlen.run(_parse(["--model", "qwen2.5-0.5b,qwen2.5-7b", "--stage", "sft,dpo", "--estimate", "--json",
                            "--out", str(tmp_path)]))
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and "estimated" in out[0]
    doc = json.loads(out[-1])
    assert doc["schema"] == "spbench.maxlen/1" and doc["provenance"]["command"].startswith("spbench maxlen")
    assert len(doc["rows"]) == 4
    for row in doc["rows"]:
        for key in ("model", "stage", "gpus", "gpu_mem_gib", "sp", "zero", "offload", "max_len", "source", "peak_gib"):
            assert key in row
        assert row["source"] == "estimated" and row["gpus"] == 8 and row["sp"] == 8 and row["zero"] == 3
        assert row["offload"] == "optimizer,param" and row["max_len"] % 1024 == 0 and row["peak_gib"] <= 80
    rows = {(r["model"], r["stage"]): r["max_len"] for r in doc["rows"]}
    assert rows["qwen2.5-7b", "sft"] == memmodel.maxlen_estimate("qwen2.5-7b", "sft", 8, 80, 8, 3,
                                                                 {"optimizer", "param"}, MemoryFeatures())
    assert rows["qwen2.5-7b", "dpo"] < rows["qwen2.5-7b", "sft"] < rows["qwen2.5-0.5b", "sft"]
    assert json.loads((tmp_path / "maxlen.json").read_text()) == doc
    assert not list(tmp_path.glob(".*.tmp"))


def test_feature_flags_and_plain_setup(tmp_path, capsys):
    maxlen.run(_parse(["--model", "qwen2.5-7b", "--estimate", "--json", "--out", str(tmp_path),
                       "--no-tiled-loss", "--no-tiled-mlp", "--no-tiled-norm", "--gpus", "1", "--zero", "0", "--offload", "none",
                       "--gpu-mem", "139"]))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["variant"] == "plain" and 32_768 <= row["max_len"] < 65_536  # measured: ok at 32k, OOM at 64k
    maxlen.run(_parse(["--model", "qwen2.5-7b", "--estimate", "--json", "--out", str(tmp_path),
                       "--checkpoint-offload"]))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["variant"] == "ours+ckpt-offload" and row["features"]["checkpoint_offload"] is True


def test_suite_expands_and_flags_override(tmp_path):
    cases, res = maxlen.build_targets(_parse(["--suite", str(SUITE), "--out", str(tmp_path)]))
    assert res == 1024 and len(cases) == 9 * 2 * 4  # Qwen2.5 0.5B-72B, Llama-3.1 8B and 70B
    assert {c.variant for c in cases} == {"ours", "ours+ckpt-offload", "plain", "ours+lora"}
    assert {c.setup.finetuning for c in cases if c.variant == "ours+lora"} == {"lora"}
    assert all(c.setup.gpus == 8 and c.setup.gpu_mem_gib == 80 and c.setup.zero == 3
               and c.setup.offload == {"optimizer", "param"} for c in cases)
    cases, _ = maxlen.build_targets(_parse(["--suite", str(SUITE), "--model", "qwen2.5-7b", "--gpus", "16",
                                          "--sp", "8,16", "--no-tiled-loss"]))
    assert len(cases) == 2 * 2 and {c.setup.sp for c in cases} == {8, 16} and all(c.setup.gpus == 16 for c in cases)
    assert all(c.setup.features.tiled_loss_chunk is None for c in cases)


@pytest.mark.parametrize("argv,msg", [
    ([], "no model"),
    (["--model", "qwen2.5-8b"], "did you mean"),
    (["--model", "qwen2.5-7b", "--stage", "ppo"], "--stage"),
    (["--model", "qwen2.5-7b", "--sp", "3"], "divide --gpus 8"),
    (["--model", "qwen2.5-7b", "--sp", "x"], "--sp must be an integer"),
    (["--model", "qwen2.5-7b", "--zero", "1", "--offload", "none"], "ZeRO stage 1 unsupported"),
    (["--model", "qwen2.5-7b", "--offload", "disk"], "--offload"),
    (["--model", "qwen2.5-7b", "--zero", "0"], "offload none"),
    (["--model", "qwen2.5-7b", "--zero", "2", "--offload", "param"], "needs ZeRO 3"),
    (["--model", "qwen2.5-7b", "--gpus", "0"], "--gpus"),
    (["--model", "qwen2.5-7b", "--gpu-mem", "0"], "--gpu-mem"),
    (["--model", "qwen2.5-7b", "--resolution", "0"], "--resolution"),
    (["--suite", "no/such.toml"], "does not exist"),
])
def test_bad_input_is_one_line_usage_error(argv, msg, tmp_path):
    with pytest.raises(UsageError, match=msg) as e:
        maxlen.run(_parse([*argv, "--estimate", "--out", str(tmp_path)]))
    assert "\n" not in str(e.value)


def test_bad_suites(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, msg in [("schema = 'x'", "schema"), ("schema = 'spbench.maxlen-suite/1'\nfoo = 1", "unknown keys"),
                      ("schema = [", "not valid TOML"),
                      ("schema = 'spbench.maxlen-suite/1'\nmodels=['tiny']\n[[variants]]\ntiled_loss=true", "'name'")]:
        bad.write_text(text)
        with pytest.raises(UsageError, match=msg):
            maxlen.build_targets(_parse(["--suite", str(bad)]))


def test_table_format():
    case = _target("qwen2.5-7b", "sft", 8, 80.0, 8, 3, ("optimizer", "param"), MemoryFeatures())
    table = format_table([estimate_row(case, 1024)])
    lines = table.splitlines()
    assert len(lines) == 3 and "estimated" in lines[2] and "8×80 GiB" in lines[2] and "M" in lines[2]
    assert "hybrid u4×r2" in lines[2]  # 28 heads do not split 8 ways: the runtime's gcd split, shown


def test_a_strategy_the_runtime_refuses_is_refused_not_estimated(capsys, tmp_path):
    from spbench.cli import main

    code = main(["maxlen", "--model", "qwen2.5-7b", "--sp-method", "ulysses", "--estimate", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "heads(28) are not divisible by the ulysses degree(8)" in err[0]
    assert not (tmp_path / "maxlen.json").exists()
