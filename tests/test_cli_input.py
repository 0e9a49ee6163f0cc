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
    cfg = tmp_path / "run.yaml"  # a long run killed by its timeout: the ranks fail mid-run
    cfg.write_text(f"model_name_or_path: tiny\ndevice: cpu\ncutoff_len: 32\nmax_steps: 100000\ndtype: float32\n"
                   f"output_dir: {out}\n")
    # 20 s: the rank must get past start-up to its first step (8 s was not enough on a box loaded by other jobs)
    assert main(["train", str(cfg), "--nproc", "1", "--timeout", "20"]) == 1
    assert (out / "metrics.jsonl").exists()  # it did run
    assert not (out / "provenance.json").exists()


BAD_CONFIG_VALUES = [  # YAML line → what the one-line error names
    ("learning_rate: -1", "learning_rate"), ("learning_rate: .nan", "learning_rate"),
    ("learning_rate: abc", "learning_rate"), ("weight_decay: -0.1", "weight_decay"),
    ("sequence_parallel_size: true", "sequence_parallel_size"), ("sequence_parallel_size: 2.5", "sequence_parallel_size"),
    ("sequence_parallel_size: null", "sequence_parallel_size"), ('gradient_checkpointing: "false"', "gradient_checkpointing"),
    ('packing: "no"', "packing"), ("warmup_steps: -1", "warmup_steps"), ("warmup_steps: 0.1", "warmup_steps"),
    ("max_grad_norm: -1", "max_grad_norm"), ("max_steps: five", "max_steps"), ('cutoff_len: "256"', "cutoff_len"),
    ("seed: 1\nseed: 2", "appears twice"), ("dataset: [a.jsonl, b.jsonl]", "dataset"),
]


@pytest.mark.parametrize("line,names", BAD_CONFIG_VALUES, ids=[b[0] for b in BAD_CONFIG_VALUES])
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, capsys, line, names):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\noutput_dir: {tmp_path / 'run'}\n{line}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_number_written_as_a_string_is_a_number_as_llama_factory_reads_it(tmp_path):
    from runtime.config import load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text('learning_rate: "5e-6"\nnum_train_epochs: 3\n')
    c = load_config(cfg)
    assert c.learning_rate == 5e-6 and c.num_train_epochs == 3.0 and isinstance(c.num_train_epochs, float)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"model_name_or_path: tiny\nrun_name: caf\xe9\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8" in err[0]


@pytest.mark.parametrize("content,message", [
    (b'{"instruction": "caf\xe9", "output": "x"}\n', "not UTF-8"),
    (b'{"instruction": "' + b"p" * 300 + b'", "output": "answer"}\n', "keeps a supervised token"),
    (b"", "has no records"),
])
def test_unusable_data_is_one_line_before_any_rank(tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\ndataset: {data}\ncutoff_len: 64\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def _checkpoint(tmp_path, config_text: str | None, weights: bool):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if config_text is not None:
        (ckpt / "config.json").write_text(config_text)
    if weights:
        (ckpt / "model.safetensors").write_bytes(b"")
    return ckpt


@pytest.mark.parametrize("setup,message", [
    (lambda t: _checkpoint(t, "{not json", True), "config.json is unusable"),
    (lambda t: _checkpoint(t, '{"model_type": "no-such-model"}', True), "config.json is unusable"),
    (lambda t: _checkpoint(t, '{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, '
                              '"num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64, '
                              '"vocab_size": 300}', False), "has no weights"),
])
def test_unusable_checkpoints_are_one_line(tmp_path, capsys, setup, message):
    ckpt = setup(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {ckpt}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("extra,argv_tail,message", [
    ("deepspeed: DS\n", [], "is not valid JSON"),
    ("device: cuda\n", [], "no CUDA GPU"),
    ("", ["--backend", "nccl"], "--backend nccl needs CUDA"),
])
def test_engines_the_machine_cannot_run_are_one_line(tmp_path, capsys, extra, argv_tail, message):
    import torch

    if torch.cuda.is_available() and "cuda" in message.lower():
        pytest.skip("this machine has CUDA")
    ds = tmp_path / "ds.json"
    ds.write_text("{broken")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\noutput_dir: {tmp_path / 'run'}\n" + extra.replace("DS", str(ds)))
    assert main(["train", str(cfg), *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_check_attention_with_nccl_and_no_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["check-attention", "--method", "ring", "--sp", "2", "--backend", "nccl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs CUDA" in err[0]


@pytest.mark.parametrize("toml,message", [
    ('[suite]\nname = "x"\n', "no cases"),
    ('[[cases]]\nmethod = "ring"\nsp = 2\n', "stage"),
    ('[[cases]]\nstage = "sft"\nmethod = "ring"\nsp = 2\nzero = 5\n', "ZeRO stage 5"),
    ('cases = ["sft"]\n', "must be a table"),
    ('cases = "sft"\n', "array of tables"),
    ("[[cases]\n", "not valid TOML"),
])
def test_bad_suites_are_one_line(tmp_path, capsys, toml, message):
    suite = tmp_path / "s.toml"
    suite.write_text(toml)
    assert main(["parity", "--suite", str(suite), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"sp_losses": "boom"}, "sp_losses must be a list of numbers"),
    ({"ref_losses": ["1", "2"]}, "ref_losses must be a list of numbers"),
    ({"metrics": "x"}, "metrics must be an object"),
])
@pytest.mark.parametrize("command", ["gate", "report"])
def test_malformed_results_are_unusable_input_not_regressions(tmp_path, capsys, change, message, command):
    import json

    from spbench.common.suites import golden

    doc = json.loads(golden("ci").read_text())
    doc["cases"][0].update(change)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    out = tmp_path / "rep"
    argv = (["gate", "--baseline", str(golden("ci")), "--results", str(bad)] if command == "gate"
            else ["report", str(bad), "--out", str(out)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # report: nothing half-written


@pytest.mark.parametrize("argv,message", [
    (["faults", "--only", "F99"], "unknown fault id"),
    (["gpu-check", "--dry-run", "--budget", "1"], "--budget"),
    (["gpu-check", "--dry-run", "--only", "nope"], "--only"),
    (["maxlen", "--model", "no-such-model", "--estimate"], "neither a preset"),
    (["check-attention", "--method", "ulysses", "--sp", "4", "--heads", "6", "--kv-heads", "2"], "not divisible"),
])
def test_every_command_answers_bad_input_with_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] in ("maxlen", "gpu-check") else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
