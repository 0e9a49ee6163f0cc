"""`spbench gpu-check` without a GPU: a fake runner answers every command with canned output on a fake clock.

Nothing here starts a process (the autouse fixture makes subprocess.Popen fail the test).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.memory import MemoryFeatures
from spbench import cli
from spbench.cli import gpu_check as gpucheck
from spbench.common.errors import UsageError
from spbench.common.units import GiB
from spbench.gpu import plan as gpuplan
from spbench.gpu import results as gpuresults
from spbench.gpu.results import Completed
from spbench.memory import model as memmodel

NOW = datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc)
H200 = {"name": "NVIDIA H200", "total_gib": 139.8, "count": 1}
PROV = {"git_sha": "cafe1234", "command": "stub"}
PEAKS = {"qwen2.5-0.5b-plain-32k": 60.0, "qwen2.5-0.5b-ours-32k": 8.0, "qwen2.5-7b-plain-16k": 74.0,
         "qwen2.5-7b-ours-16k": 66.0, "qwen2.5-7b-plain-32k": 105.0, "qwen2.5-7b-ours-32k": 69.0, "dist": 9.0,
         "maxlen": 60.0}
RATES = {"qwen2.5-0.5b-plain-32k": 40_000.0, "qwen2.5-0.5b-ours-32k": 50_000.0, "qwen2.5-7b-plain-16k": 7_000.0,
         "qwen2.5-7b-ours-16k": 8_000.0, "qwen2.5-7b-plain-32k": 6_000.0, "qwen2.5-7b-ours-32k": 7_500.0,
         "dist": 30_000.0, "maxlen": 9_000.0}
PROBE_KEYS = [f"{m}-{v}-{n // 1024}k" for m, n in gpuplan.PROBES for v in ("plain", "ours")]
ATTN_ERR = {"out": 3e-3, "lse": 1e-4, "dq": 8e-3, "dk": 6e-3, "dv": 5e-3}
NAMES = ["attention-zigzag", "attention-ulysses", "attention-hybrid", "parity-sft-zigzag-sp2",
         *(f"probe-{k}" for k in PROBE_KEYS), "dist-qwen2.5-0.5b-sp2-64k", "maxlen-qwen2.5-0.5b"]
KEYS = ["attention-zigzag", "attention-ulysses", "attention-hybrid", "parity", *PROBE_KEYS, "dist", "maxlen"]


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"test started a process: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(gpucheck, "provenance", lambda *a, **k: dict(PROV))


# ------------------------------------------------------------------------------------------- fake GPU
def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def key_of(argv: list[str]) -> str:
    """Which planned step a command is: attention-<method>, parity, <model>-<variant>-<n>k or maxlen."""
    if "check-attention" in argv:
        return f"attention-{_flag(argv, '--method')}"
    if "parity" in argv:
        return "parity"
    if "spbench.memory.distprobe" in argv:
        return "dist"
    model, length = _flag(argv, "--model"), int(_flag(argv, "--length"))
    if (model, length) not in gpuplan.PROBES:
        return "maxlen"
    return f"{model}-{'plain' if _flag(argv, '--attention') == 'sdpa' else 'ours'}-{length // 1024}k"


def ok_json(doc: dict, rc: int = 0, wall: float = 0.0) -> Completed:
    return Completed(rc, "log line\n" + json.dumps(doc) + "\n", "", wall)


def parity_answer(case: dict, rc: int = 0):
    """A parity command: writes its results file into --out and prints the --json line."""

    def answer(argv: list[str]) -> Completed:
        path = Path(_flag(argv, "--out")) / "adhoc.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schema": "spbench.results/1", "suite": "adhoc", "cases": [case]}))
        return ok_json({"results": str(path), "report": "report.md", "passed": case["passed"]}, rc)

    return answer


PARITY_CASE = {"name": "sft-zigzag-sp2", "passed": True, "error": None, "failures": [],
               "tolerance": {"loss": 2e-2, "grad": 5e-2},
               "metrics": {"max_loss_rel_err": 1.5e-3, "max_grad_norm_rel_err": 4e-3, "max_param_grad_rel_err": 9e-3,
                           "worst_param": "model.layers.0.mlp.up_proj.weight", "max_dpo_rel_err": None}}


def default_answer(key: str, argv: list[str]) -> Completed:
    if key.startswith("attention"):
        return ok_json({"method": key.split("-")[1], "passed": True, "max_rel_err": ATTN_ERR,
                        "max_abs_err": {k: 2 * v for k, v in ATTN_ERR.items()}, "tolerance": 0.05, "kernel": "cudnn"})
    if key == "parity":
        return parity_answer(PARITY_CASE)(argv)
    length = int(_flag(argv, "--length"))
    ranks = {"rank_tokens": length // int(_flag(argv, "--nproc"))} if key == "dist" else {}  # as distprobe prints
    return ok_json({"schema": "spbench.probe/1", "status": "ok", "oom": False, "peak_gib": PEAKS[key],
                    "tokens": length, "tokens_per_s": RATES[key], "step_s": length / RATES[key],
                    "device_name": "NVIDIA H200", **ranks})


class FakeGpu:
    """The runner and the clock: each command takes `durations[key]` seconds (default 5) of fake time, or is
    killed at its timeout; `answers[key]` overrides the canned output (a Completed or argv → Completed)."""

    def __init__(self, answers=None, durations=None, on_call=None):
        self.t, self.calls = 0.0, []
        self.answers, self.durations, self.on_call = answers or {}, durations or {}, on_call

    def clock(self) -> float:
        return self.t

    def __call__(self, argv: list[str], timeout: float) -> Completed:
        key = key_of(argv)
        self.calls.append((key, argv, timeout))
        if self.on_call:
            self.on_call(key)
        took = self.durations.get(key, 5.0)
        if took > timeout:
            self.t += timeout
            return Completed(None, "partial output\n", "", timeout, timed_out=True)
        self.t += took
        answer = self.answers.get(key)
        done = answer(argv) if callable(answer) else answer or default_answer(key, argv)
        done.wall_s = took
        return done


def args_for(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return cli.build_parser(["gpu-check"]).parse_args(["gpu-check", "--out", str(tmp_path), *extra])


def run_fake(tmp_path: Path, gpu: FakeGpu, *extra: str, device=H200) -> tuple[int, dict | None]:
    code = gpucheck.run(args_for(tmp_path, *extra), runner=gpu, device=lambda: device, clock=gpu.clock,
                        now=lambda: NOW, progress=open("/dev/null", "w"))
    path = tmp_path / "gpu-check-2026-11-30.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def step(doc: dict, name: str) -> dict:
    return next(s for s in doc["steps"] if s["name"] == name)


def predicted(model: str, features: MemoryFeatures, length: int, gpu_mem: float = H200["total_gib"]) -> float:
    setup = memmodel.Setup(model, "sft", 1, gpu_mem, 1, 0, frozenset(), features)
    return memmodel.peak_memory(setup, length)["total_gib"]


# ---------------------------------------------------------------------------------------------- full run
def test_full_run_writes_the_document(tmp_path, capsys):
    gpu = FakeGpu()
    code, doc = run_fake(tmp_path, gpu)
    assert code == 0
    assert doc["schema"] == "spbench.gpu-check/1" and doc["passed"] is True and doc["complete"] is True
    assert doc["final"] is True and doc["provenance"] == PROV and doc["device"] == H200
    assert [s["name"] for s in doc["steps"]] == NAMES
    assert all(s["status"] == "passed" for s in doc["steps"])
    assert doc["summary"] == {"executed": 12, "passed": 12, "failed": [], "skipped": []}
    assert doc["settings"]["gpu_mem_gib"] == H200["total_gib"] and doc["settings"]["gpu_mem_source"] == "device"

    attn = step(doc, "attention-hybrid")
    assert attn["kernel"] == "cudnn" and attn["max_rel_err"] == ATTN_ERR and attn["tolerance"] == 0.05
    assert (attn["seq"], attn["heads"], attn["kv_heads"], attn["head_dim"], attn["dtype"]) == (4096, 28, 4, 128,
                                                                                             "bfloat16")
    parity = step(doc, "parity-sft-zigzag-sp2")
    assert parity["metrics"] == PARITY_CASE["metrics"] and parity["results"].endswith("adhoc.json")

    for model, length in gpuplan.PROBES:
        for variant, features in (("plain", MemoryFeatures.plain()), ("ours", MemoryFeatures())):
            key = f"{model}-{variant}-{length // 1024}k"
            rec = step(doc, f"probe-{key}")
            peak, pred = PEAKS[key], predicted(model, features, length)
            assert rec["peak_gib"] == peak and rec["predicted_gib"] == pytest.approx(pred, rel=1e-12)
            assert rec["model_error"] == pytest.approx(pred / peak - 1, rel=1e-12)
            assert rec["model_error_within_goal"] == (abs(pred / peak - 1) <= 0.10)
            assert rec["bytes_per_token"] == pytest.approx(peak * GiB / length)
            assert rec["bytes_per_token_basis"] == "peak / tokens"
            assert rec["tokens_per_s"] == RATES[key] and rec["steps"] == 2
            assert rec["attention"] == ("sdpa" if variant == "plain" else "runtime")
    comp = {c["model"]: c for c in doc["comparisons"]}
    assert {m: c["tokens_per_s_ratio"] for m, c in comp.items()} == pytest.approx(
        {"qwen2.5-0.5b": 50_000 / 40_000, "qwen2.5-7b": 7_500 / 6_000})
    assert comp["qwen2.5-7b"]["tokens_per_s_goal_met"] is True and comp["qwen2.5-0.5b"]["tokens_per_s_goal_met"] is True
    slopes = comp["qwen2.5-7b"]["activation_mb_per_token"]  # (peak 32k − peak 16k) / 16,384 tokens
    assert slopes == pytest.approx({"plain": 31.0 * GiB / 16384 / 1e6, "ours": 3.0 * GiB / 16384 / 1e6})
    assert comp["qwen2.5-7b"]["activation_goal_met"] is True  # 0.197 MB ≤ 0.3
    assert comp["qwen2.5-0.5b"]["activation_mb_per_token"] == {"plain": None, "ours": None}
    assert comp["qwen2.5-0.5b"]["activation_goal_met"] is None  # one length: no slope

    dist = step(doc, "dist-qwen2.5-0.5b-sp2-64k")
    share = H200["total_gib"] / 2
    dist_setup = memmodel.Setup("qwen2.5-0.5b", "sft", 2, share, 2, 0, frozenset(), MemoryFeatures(), "ulysses")
    assert dist["rank_cap_gib"] == share and dist["peak_gib"] == 9.0 and dist["status"] == "passed"
    assert dist["predicted_gib"] == pytest.approx(memmodel.peak_memory(dist_setup, 65536)["total_gib"])
    assert dist["bytes_per_token"] == pytest.approx(9.0 * GiB / 32768)  # each rank holds half the sequence

    setup = memmodel.Setup("qwen2.5-0.5b", "sft", 1, H200["total_gib"], 1, 0, frozenset(), MemoryFeatures())
    max_len = memmodel.maxlen_for(setup, resolution=1024)
    m = step(doc, "maxlen-qwen2.5-0.5b")
    assert m["predicted_max_len"] == max_len and m["length"] == int(max_len * 0.1) // 1024 * 1024
    assert m["result"] == "success" and m["predicted_gib"] == pytest.approx(predicted("qwen2.5-0.5b", MemoryFeatures(),
                                                                                      m["length"]))
    assert m["model_error"] == pytest.approx(m["predicted_gib"] / 60.0 - 1)

    argv = {key: a for key, a, _ in gpu.calls}
    assert _flag(argv["maxlen"], "--length") == str(m["length"])
    assert "--gpu-mem-gib" not in argv["maxlen"]  # the device's own memory: no cap
    assert argv["qwen2.5-7b-plain-32k"][-11:] == ["--loss-chunk", "none", "--mlp-chunks", "none", "--norm-chunk", "none",
                                                  "--gradient-checkpointing", "--attention", "sdpa", "--steps", "2"]
    assert argv["qwen2.5-7b-ours-32k"][-11:] == ["--loss-chunk", "1024", "--mlp-chunks", "auto", "--norm-chunk", "4096",
                                                 "--gradient-checkpointing", "--attention", "runtime", "--steps", "2"]
    assert _flag(argv["maxlen"], "--attention") == "runtime" and _flag(argv["maxlen"], "--steps") == "1"
    assert [_flag(argv["dist"], f) for f in ("--nproc", "--sp", "--method", "--backend", "--length")] == \
        ["2", "2", "ulysses", "gloo-cuda", "65536"]
    assert {_flag(argv[f"attention-{x}"], "--backend") for x in ("zigzag", "ulysses", "hybrid")} == {"gloo-cuda"}
    assert [_flag(argv["parity"], f) for f in ("--stage", "--method", "--sp", "--dtype", "--steps", "--backend")] == \
        ["sft", "zigzag", "2", "bfloat16", "3", "gloo-cuda"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check-2026-11-30.json", "parity-2026-11-30"]

    out = capsys.readouterr().out
    assert "PASSED: 12/12 executed checks passed" in out
    assert "qwen2.5-7b at 32,768: ours / plain tokens/s = 1.25 (goal >= 1.2: met)" in out
    assert "qwen2.5-7b activation MB/token (16,384 -> 32,768 slope): plain 2.032, ours 0.197 (goal ours <= 0.3: met)" \
        in out
    assert "kernel cudnn, max rel err 8.0e-03" in out


def test_static_memory_is_subtracted_when_the_probe_reports_it(tmp_path):
    probe = {"schema": "spbench.probe/1", "status": "ok", "peak_gib": 70.0, "static_gib": 66.0, "tokens": 16384,
             "tokens_per_s": 7000.0}
    code, doc = run_fake(tmp_path, FakeGpu(answers={"qwen2.5-7b-ours-16k": ok_json(probe)}), "--only", "probes")
    rec = step(doc, "probe-qwen2.5-7b-ours-16k")
    assert code == 0 and rec["bytes_per_token"] == pytest.approx(4.0 * GiB / 16384)
    assert rec["bytes_per_token_basis"] == "(peak - static) / tokens"
    assert step(doc, "probe-qwen2.5-7b-plain-16k")["bytes_per_token_basis"] == "peak / tokens"


def test_gpu_mem_flag_sets_the_model_and_caps_the_probes(tmp_path):
    gpu = FakeGpu()
    code, doc = run_fake(tmp_path, gpu, "--gpu-mem", "80", "--only", "probes,dist,maxlen")
    assert code == 0 and doc["settings"]["gpu_mem_source"] == "--gpu-mem"
    assert len(gpu.calls) == 8 and {_flag(argv, "--gpu-mem-gib") for key, argv, _ in gpu.calls if key != "dist"} == {"80"}
    assert _flag(dict((k, a) for k, a, _ in gpu.calls)["dist"], "--gpu-mem-gib") == "40"  # two ranks share the card
    m = step(doc, "maxlen-qwen2.5-0.5b")
    setup = memmodel.Setup("qwen2.5-0.5b", "sft", 1, 80.0, 1, 0, frozenset(), MemoryFeatures())
    assert m["predicted_max_len"] == memmodel.maxlen_for(setup) and m["gpu_mem_gib"] == 80.0


# ---------------------------------------------------------------------------------------------- budget
def test_budget_runs_out_remaining_steps_are_skipped(tmp_path):
    gpu = FakeGpu(durations={k: 100.0 for k in ("attention-zigzag", "attention-ulysses", "attention-hybrid")})
    code, doc = run_fake(tmp_path, gpu, "--budget", "250")
    assert code == 1 and [c[0] for c in gpu.calls] == ["attention-zigzag", "attention-ulysses", "attention-hybrid"]
    assert [c[2] for c in gpu.calls] == [120.0, 120.0, 50.0]  # the third is clipped to the 50 s left
    hybrid = step(doc, "attention-hybrid")
    assert hybrid["status"] == "failed" and hybrid["reason"] == "timeout after 50 s (budget)"
    assert hybrid["returncode"] is None
    rest = doc["steps"][3:]
    assert len(rest) == 9 and all(s["status"] == "skipped: budget" and s["passed"] is None for s in rest)
    assert doc["summary"]["skipped"] == NAMES[3:] and doc["summary"]["failed"] == ["attention-hybrid"]
    assert doc["complete"] is False and doc["passed"] is False


def test_skipped_steps_do_not_fail_the_executed_ones(tmp_path):
    gpu = FakeGpu(durations={k: 100.0 for k in ("attention-zigzag", "attention-ulysses", "attention-hybrid")})
    code, doc = run_fake(tmp_path, gpu, "--budget", "305")  # 5 s left after three steps: less than MIN_STEP_S
    assert code == 0 and len(gpu.calls) == 3
    assert doc["passed"] is True and doc["complete"] is False and len(doc["summary"]["skipped"]) == 9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(durations=st.lists(st.floats(0, 400), min_size=len(KEYS), max_size=len(KEYS)), budget=st.floats(10, 2000))
def test_run_plan_never_exceeds_the_budget(durations, budget):
    steps = gpuplan.build_plan(139.0, 0.5, Path("/nonexistent"))
    gpu = FakeGpu(durations=dict(zip(KEYS, durations)),
        answers={"parity": ok_json({"results": "/nonexistent/adhoc.json", "passed": True})})
    records = gpucheck.run_plan(steps, gpu, budget, clock=gpu.clock)
    assert gpu.t <= budget + 1e-9
    for (key, _, timeout), s in zip(gpu.calls, steps):
        assert timeout <= s.timeout_s
    skipped = [r["status"] == "skipped: budget" for r in records]
    assert skipped == sorted(skipped)  # once skipped, every later step is skipped
    assert len(gpu.calls) == skipped.count(False)


def test_document_is_rewritten_after_every_step(tmp_path):
    seen = []

    def peek(key):
        path = tmp_path / "gpu-check-2026-11-30.json"
        seen.append(json.loads(path.read_text()) if path.exists() else None)

    run_fake(tmp_path, FakeGpu(on_call=peek), "--only", "attention")
    assert seen[0] is None
    assert [len(d["steps"]) for d in seen[1:]] == [1, 2] and not any(d["final"] for d in seen[1:])


# ------------------------------------------------------------------------------------------- failures
def _failed_parity(argv):
    case = {**PARITY_CASE, "passed": False, "failures": ["loss step 2: rel err 3e-2 > 2e-02"]}
    return parity_answer(case, rc=1)(argv)


FAILURES = {
    "attention-ulysses": (ok_json({"passed": False, "max_rel_err": {**ATTN_ERR, "dq": 0.2}, "tolerance": 0.05,
                                   "kernel": "sdpa", "max_abs_err": {}}, rc=1), "dq rel err 0.2 > 5e-02"),
    "attention-zigzag": (Completed(1, "spawning\n", "Traceback\nRankError: rank 1 died\n", 0.0),
                         "exit 1, no JSON: RankError: rank 1 died"),
    "parity": (_failed_parity, "loss step 2"),
    "qwen2.5-7b-plain-16k": (ok_json({"status": "error", "oom": False, "error": "RuntimeError: boom"}, rc=1),
                         "RuntimeError: boom"),
    "qwen2.5-0.5b-ours-32k": (Completed(-9, "", "Killed\n", 0.0), "exit -9, no JSON: Killed"),
    "maxlen": (ok_json({"status": "oom", "oom": True, "error": "OutOfMemoryError: CUDA out of memory"}),
               "OutOfMemoryError"),
}
STEP_OF = {"attention-ulysses": "attention-ulysses", "attention-zigzag": "attention-zigzag",
           "parity": "parity-sft-zigzag-sp2", "qwen2.5-7b-plain-16k": "probe-qwen2.5-7b-plain-16k",
           "qwen2.5-0.5b-ours-32k": "probe-qwen2.5-0.5b-ours-32k", "maxlen": "maxlen-qwen2.5-0.5b"}


@pytest.mark.parametrize("key", list(FAILURES))
def test_one_failed_check_exits_1(tmp_path, key):
    answer, reason = FAILURES[key]
    code, doc = run_fake(tmp_path, FakeGpu(answers={key: answer}))
    name = STEP_OF[key]
    assert code == 1 and doc["passed"] is False and doc["summary"]["failed"] == [name]
    rec = step(doc, name)
    assert rec["status"] == "failed" and reason in rec["reason"]
    assert all(s["status"] == "passed" for s in doc["steps"] if s["name"] != name)


def test_maxlen_oom_and_timeout_are_recorded(tmp_path):
    code, doc = run_fake(tmp_path, FakeGpu(answers={"maxlen": FAILURES["maxlen"][0]}), "--only", "maxlen")
    m = step(doc, "maxlen-qwen2.5-0.5b")
    assert code == 1 and m["result"] == "oom" and m["probe_status"] == "oom" and m.get("model_error") is None
    code, doc = run_fake(tmp_path, FakeGpu(durations={"maxlen": 1e6}), "--only", "maxlen", "--budget", "100")
    m = step(doc, "maxlen-qwen2.5-0.5b")
    assert code == 1 and m["result"] == "timeout" and m["reason"] == "timeout after 100 s (budget)"


def test_parity_results_file_missing_is_a_failure(tmp_path):
    missing = ok_json({"results": str(tmp_path / "nope.json"), "passed": True})
    code, doc = run_fake(tmp_path, FakeGpu(answers={"parity": missing}), "--only", "parity")
    assert code == 1 and "cannot read" in step(doc, "parity-sft-zigzag-sp2")["reason"]


# ------------------------------------------------------------------------------- memory model arithmetic
def test_model_error_and_bytes_per_token():
    r = gpuresults
    assert r.model_error(110.0, 100.0) == pytest.approx(0.10)
    assert r.model_error(90.0, 100.0) == pytest.approx(-0.10)
    assert r.model_error(None, 100.0) is None and r.model_error(90.0, None) is None
    assert r.model_error(90.0, 0.0) is None
    assert r.bytes_per_token({"peak_gib": 2.0}, 1024) == (2 * GiB / 1024, "peak / tokens")
    assert r.bytes_per_token({"peak_gib": 2.0, "static_gib": 1.5}, 1024) == (0.5 * GiB / 1024,
                                                                             "(peak - static) / tokens")
    assert r.bytes_per_token({"peak_gib": None}, 1024) == (None, None)


def test_activation_slope_uses_the_shortest_and_longest_measured_lengths():
    slope = gpuresults.activation_slope
    assert slope({16384: {"peak_gib": 66.0}, 32768: {"peak_gib": 69.0}}) == pytest.approx(3 * GiB / 16384 / 1e6)
    assert slope({8192: {"peak_gib": 1.0}, 16384: {}, 32768: {"peak_gib": 4.0}}) == pytest.approx(3 * GiB / 24576 / 1e6)
    assert slope({16384: {"peak_gib": 66.0}, 32768: {"status": "oom"}}) is None


def test_plan_predicts_each_variant_with_its_own_features():
    steps = {s.name: s for s in gpuplan.build_plan(139.0, 0.25, Path("/x"))}
    plain = steps["probe-qwen2.5-0.5b-plain-32k"].info["predicted_gib"]
    ours = steps["probe-qwen2.5-0.5b-ours-32k"].info["predicted_gib"]
    assert plain == pytest.approx(predicted("qwen2.5-0.5b", MemoryFeatures.plain(), 32768, 139.0))
    assert ours == pytest.approx(predicted("qwen2.5-0.5b", MemoryFeatures(), 32768, 139.0))
    assert plain > 2 * ours  # full-vocabulary logits dominate plain at 32k
    m = steps["maxlen-qwen2.5-0.5b"].info
    assert m["length"] % 1024 == 0 and m["length"] <= 0.25 * m["predicted_max_len"] < m["length"] + 1024


# ----------------------------------------------------------------------------------- CLI, dry run, errors
def test_dry_run_lists_the_planned_commands_without_a_gpu(tmp_path, capsys):
    def refuse(argv, timeout):
        raise AssertionError("dry run ran a command")

    code = gpucheck.run(args_for(tmp_path / "out", "--dry-run"), runner=refuse, device=lambda: None, now=lambda: NOW)
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and not (tmp_path / "out").exists()
    assert out[0] == "gpu-check plan: 12 steps within 540 s, GPU memory 139.0 GiB (default (H200))"
    assert [line.split()[1] for line in out[1:]] == NAMES
    steps = gpuplan.build_plan(139.0, 0.1, (tmp_path / "out" / "parity-2026-11-30").resolve())
    assert [line.split("  ")[-1].strip() for line in out[1:]] == [s.command for s in steps]
    assert "check-attention --method hybrid --sp 2 --heads 28 --kv-heads 4 --seq 4096 --head-dim 128 " \
           "--dtype bfloat16 --backend gloo-cuda" in out[3]


def test_no_cuda_prints_one_line_and_exits_2(tmp_path, capsys):
    calls = []
    code = gpucheck.run(args_for(tmp_path, "--only", "parity"), runner=lambda *a: calls.append(a),
                        device=lambda: None)
    captured = capsys.readouterr()
    assert code == 2 and captured.err == "gpu-check needs a CUDA GPU\n" and captured.out == "" and calls == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [
    (["--budget", "0"], "--budget"), (["--budget", "5"], "--budget"), (["--maxlen-fraction", "0"], "--maxlen-fraction"),
    (["--maxlen-fraction", "1.5"], "--maxlen-fraction"), (["--gpu-mem", "0.2"], "--gpu-mem"),
    (["--only", "attention,bogus"], "--only"), (["--only", ","], "--only")])
def test_bad_input_exits_2_with_one_line(capsys, argv, flag):
    assert cli.main(["gpu-check", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spbench gpu-check: error: ") and flag in err


def test_a_gpu_too_small_for_any_length_is_bad_input(tmp_path):
    with pytest.raises(UsageError, match="does not fit on 2 GiB"):
        gpucheck.run(args_for(tmp_path, "--gpu-mem", "2"), runner=FakeGpu(), device=lambda: H200)


def test_subcommand_is_registered():
    args = cli.build_parser(["gpu-check"]).parse_args(["gpu-check", "--budget", "60", "--only", "maxlen"])
    assert args.func is gpucheck.run and args.budget == 60.0 and args.maxlen_fraction == 0.1


def test_nox_gpu_session_uses_the_machines_python_and_passes_posargs():
    pytest.importorskip("nox")
    path = Path(__file__).resolve().parents[1] / "noxfile.py"
    spec = importlib.util.spec_from_file_location("noxfile_under_test", path)
    noxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noxfile)
    ran = []

    class Session:
        posargs = ["--budget", "300", "--dry-run"]

        def run(self, *args, **kwargs):
            ran.append(args)

    assert noxfile.gpu.venv_backend == "none" and noxfile.gpu.__doc__
    noxfile.gpu(Session())
    assert ran == [("python", "-m", "spbench", "gpu-check", "--out", "reports/gpu", "--budget", "300", "--dry-run")]


def test_table_shows_failures_and_skips():
    doc = gpuresults.document([
        {"name": "maxlen-qwen2.5-0.5b", "kind": "maxlen", "status": "failed", "passed": False, "probe_status": "oom",
         "result": "oom", "length": 1_081_344, "predicted_gib": 120.0, "wall_s": 42.0, "reason": "OOM"},
        {"name": "probe-qwen2.5-7b-ours-16k", "kind": "probes", "status": "skipped: budget", "passed": None,
         "reason": "3 s of the 540 s budget left"}], {}, None, PROV, final=True)
    table = gpuresults.format_table(doc)
    assert "OOM at length 1,081,344 (predicted 120.0 GiB)" in table
    assert "skipped: budget" in table and "FAILED: 0/1 executed checks passed, 1 skipped (budget)" in table


def test_report_renders_the_gpu_check_document(tmp_path):
    from spbench import report

    code, doc = run_fake(tmp_path, FakeGpu(answers={"maxlen": FAILURES["maxlen"][0]}))
    text = report.render([str(tmp_path / "gpu-check-2026-11-30.json")], tmp_path / "rep").read_text()
    assert code == 1 and "## GPU check (gpu-check-2026-11-30.json): FAILED on NVIDIA H200" in text
    assert sum(line.startswith("| attention-") for line in text.splitlines()) == 3
    assert "| probe-qwen2.5-7b-ours-32k | passed | 5.0 | peak 69.0 GiB (model " in text
    assert "| maxlen-qwen2.5-0.5b | failed | 5.0 | OOM at length " in text
    assert "- qwen2.5-7b at 32,768: ours / plain tokens/s = 1.25 (goal >= 1.2: met)" in text
    assert "git_sha" in text or "cafe1234" in text  # provenance follows the section
