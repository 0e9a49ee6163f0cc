"""spbench.report: Markdown rows, failures, provenance, PNG plots, max-length tables, input errors."""
from __future__ import annotations

import pytest

from spbench import report
from spbench.cli import build_parser
from spbench.common.errors import UsageError
from spbench.common.results import results_doc, write_json_atomic
from spbench.common.schemas import MAXLEN as MAXLEN_SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROV = {"git_sha": "cafe1234", "git_dirty": False, "torch": "2.13.0+cpu", "backend": "gloo", "world": 4}


def _case(name, stage="sft", method="zigzag", sp=2, passed=True, error=None, loss_err=1e-15, sp_losses=None,
          failures=()):
    ref = [2.5, 2.25, 2.0]
    return {"name": name, "stage": stage, "pref_loss": "sigmoid" if stage == "dpo" else None, "method": method,
            "sp": sp, "dp": 1, "ga": 2, "dtype": "float64", "packing": False, "model": "tiny", "steps": 3, "zero": 0,
            "passed": passed, "error": error, "tolerance": {"loss": 1e-8, "grad": 1e-8},
            "metrics": {"max_loss_rel_err": loss_err, "max_grad_norm_rel_err": 3e-15, "max_param_grad_rel_err": 2e-14,
                        "worst_param": "model.layers.0.mlp.up_proj.weight", "max_dpo_rel_err": None},
            "failures": list(failures), "ref_losses": [] if error else ref,
            "sp_losses": [] if error else (sp_losses or ref), "ref_grad_norms": [], "sp_grad_norms": [],
            "wall_s": 0.5}


@pytest.fixture(scope="module")
def parity_file(tmp_path_factory):
    cases = [_case("sft-zigzag-sp2"),
             _case("sft-zigzag-sp4", sp=4, sp_losses=[2.5, 2.25 * (1 + 1e-12), 2.0]),
             _case("dpo-ulysses-sp2", stage="dpo", method="ulysses", passed=False, loss_err=3e-3,
                   sp_losses=[2.5, 2.25, 2.006], failures=["loss step 2: rel err 3e-3 > 1e-8"]),
             _case("sft-ring-sp8", method="ring", sp=8, passed=False, error="timed out after 600 s | rank 3",
                   loss_err=None)]
    path = tmp_path_factory.mktemp("in") / "ci.json"
    write_json_atomic(path, results_doc("ci", cases, PROV))
    return path


@pytest.fixture(scope="module")
def rendered(parity_file, tmp_path_factory):
    """(out dir, report.md text) of the parity file, rendered once: plotting takes ~1 s."""
    out = tmp_path_factory.mktemp("out")
    return out, report.render([parity_file], out).read_text()


@pytest.fixture
def maxlen_file(tmp_path):
    base = {"model": "qwen-7b", "gpus": 8, "gpu_mem_gib": 80, "zero": 3, "variant": "ours"}  # rows as maxlen writes them
    rows = [{**base, "stage": "sft", "sp": 8, "offload": "none", "sp_method": "hybrid", "ulysses": 4, "ring": 2,
             "attention_kernel": "flash-attn", "max_len": 262144, "source": "estimated", "peak_gib": 74.25},
            {**base, "stage": "sft", "sp": 4, "offload": "none", "sp_method": "ulysses", "ulysses": 4, "ring": 1,
             "max_len": 131072, "source": "measured", "peak_gib": 70.0},
            {**base, "stage": "dpo", "sp": 1, "offload": "optimizer,param", "sp_method": "ulysses", "ulysses": 1,
             "ring": 1, "variant": "plain", "max_len": None, "source": "estimated", "peak_gib": None}]
    path = tmp_path / "maxlen.json"
    write_json_atomic(path, {"schema": MAXLEN_SCHEMA, "provenance": PROV, "rows": rows})
    return path


def test_parity_table_rows(rendered):
    md = rendered[1]
    assert "## Suite `ci` (ci.json): FAILED" in md
    assert ("| sft-zigzag-sp4 | sft | zigzag | 4 | 1×2 | float64 | 1.00e-15 | 2.00e-14 | PASS "
            "| loss 1e-08, grad 1e-08 |") in md
    assert "| dpo-ulysses-sp2 | dpo (sigmoid) | ulysses | 2 | 1×2 | float64 | 3.00e-03 | 2.00e-14 | FAIL |" in md
    assert ("| sft-ring-sp8 | sft | ring | 8 | 1×2 | float64 | — | 2.00e-14 "
            "| ERROR: timed out after 600 s \\| rank 3 |") in md
    assert "- `dpo-ulysses-sp2`: loss step 2: rel err 3e-3 > 1e-8" in md
    assert "| git_sha | cafe1234 |" in md and "| world | 4 |" in md


def test_parity_plots_exist_and_are_linked(rendered):
    out, md = rendered
    pngs = {"1-ci-loss-sft-zigzag.png", "1-ci-loss-dpo-sigmoid-ulysses.png", "1-ci-loss-error.png"}
    assert {p.name for p in out.iterdir()} == pngs | {"report.md"}  # no temp files, no plot for the errored case
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"]({name})" in md


def test_maxlen_table_sorted_with_source(maxlen_file, tmp_path):
    md = report.render([maxlen_file], tmp_path / "out").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| qwen-7b")]
    assert rows == ["| qwen-7b | dpo | plain | 8 | 80 | 1 | ulysses | — | 3 | optimizer,param | — | — | estimated |",
                    "| qwen-7b | sft | ours | 8 | 80 | 4 | ulysses | — | 3 | none | 131,072 | 70.0 | measured |",
                    "| qwen-7b | sft | ours | 8 | 80 | 8 | hybrid u4×r2 | flash-attn | 3 | none | 262,144 | 74.2 | estimated |"]
    assert not list((tmp_path / "out").glob("*.png"))


def test_two_files_two_sections(parity_file, maxlen_file, tmp_path):
    md = report.render([parity_file, maxlen_file], tmp_path / "out").read_text()
    assert md.index("## Suite `ci`") < md.index("## Max trainable length (") < md.index("/maxlen.json)")
    assert md.count("### Provenance") == 2


def test_rejects_unknown_schema_before_writing(parity_file, tmp_path):
    (tmp_path / "other.json").write_text('{"schema": "lm-eval/1"}')
    with pytest.raises(UsageError, match="has schema 'lm-eval/1', expected 'spbench.results/1' or 'spbench.maxlen/1'"):
        report.render([parity_file, tmp_path / "other.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_missing_file(tmp_path):
    with pytest.raises(UsageError, match="missing.json does not exist"):
        report.render([tmp_path / "missing.json"], tmp_path / "out")


def _parse(argv):
    return build_parser(["report"]).parse_args(["report", *argv])


def test_cli(maxlen_file, tmp_path, capsys):
    args = _parse([str(maxlen_file), "--out", str(tmp_path / "cli")])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "report.md").is_file()
    assert capsys.readouterr().out.strip() == f"report: wrote {tmp_path / 'cli' / 'report.md'}"


def test_cli_bad_schema_raises_usage_error(tmp_path):
    (tmp_path / "bad.json").write_text('{"schema": "foo"}')
    args = _parse([str(tmp_path / "bad.json"), "--out", str(tmp_path / "cli")])
    with pytest.raises(UsageError, match="has schema 'foo'"):
        args.func(args)


def test_a_report_that_fails_half_way_leaves_nothing_behind(parity_file, tmp_path, monkeypatch):
    """Plots are staged with report.md and moved in together: a crash after the plots leaves no orphan PNGs."""
    def boom(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(report, "_provenance", boom)  # fails after the parity plots were drawn
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk gone"):
        report.render([parity_file], out)
    assert list(out.iterdir()) == []
