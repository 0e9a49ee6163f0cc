"""The adapter interface: a deliberately wrong implementation is called wrong (with the error size), one that
declines or raises is called refused (with its own reason), the runtime itself passes; `spbench compare` writes
its verdicts with provenance."""
from __future__ import annotations

import functools
import json

from rankjobs import train_refusing_packed

from spbench.check.cases import load_suite, select
from spbench.cli import main
from spbench.compare.adapters import SPBENCH, Implementation
from spbench.compare.run import compare
from spbench.faults.catalogue import train_with_fault

CASES = "sft-ring-sp2,sft-ulysses-sp2,packed-sft-zigzag-sp4"


def test_wrong_refused_and_pass_are_told_apart(pools):
    cases = select(load_suite("ci")[1], CASES)
    shifted = Implementation("labels-shifted-after-sharding", (), functools.partial(train_with_fault, fault="F1"))
    declines_ring = Implementation("no-ring", (), SPBENCH.sp_job,
                                   refuses=lambda c: "no-ring: ring attention is not implemented" if c.method == "ring" else None)
    raises = Implementation("no-packing", (), train_refusing_packed)
    pool_map = {w: pools(w) for w in (2, 4)}
    rows = {(r["impl"], r["case"]): r for r in compare([SPBENCH, shifted, declines_ring, raises], cases, log=lambda m: None,
                                                      pools=pool_map)}
    assert all(rows[("spbench", c.name)]["verdict"] == "pass" for c in cases)
    wrong = rows[("labels-shifted-after-sharding", "sft-ring-sp2")]
    assert wrong["verdict"] == "wrong" and "loss step" in wrong["cause"] and "max_loss_rel_err" in wrong["cause"]
    assert rows[("no-ring", "sft-ring-sp2")] == {"impl": "no-ring", "case": "sft-ring-sp2", "verdict": "refused",
                                                 "cause": "no-ring: ring attention is not implemented", "metrics": {}}
    assert rows[("no-ring", "sft-ulysses-sp2")]["verdict"] == "pass"
    refused = rows[("no-packing", "packed-sft-zigzag-sp4")]
    assert refused["verdict"] == "refused" and "fake-impl: packed sequences are not supported" in refused["cause"]


def test_compare_command_writes_verdicts_with_versions(tmp_path, capsys):
    assert main(["compare", "--impl", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["compare", "--impl", "spbench", "--case", "sft-ulysses-sp2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert doc["schema"] == "spbench.compare/1" and doc["implementations"]["spbench"]["versions"]["torch"]
    assert [(r["impl"], r["case"], r["verdict"]) for r in doc["rows"]] == [("spbench", "sft-ulysses-sp2", "pass")]
    assert "| spbench |" in (tmp_path / "report.md").read_text() and doc["provenance"]["command"].startswith("spbench")


def test_deepspeed_alst_attention_verdicts(pools):
    """DeepSpeed ALST's UlyssesSPAttentionHF equals SP off on plain rows (GQA kv 2 < SP 4 replicated included), is
    wrong on packed rows (SDPA without a mask attends across documents), and declines ring."""
    from spbench.compare.alst import DEEPSPEED_ALST

    cases = select(load_suite("ci")[1], "sft-ulysses-sp4,packed-sft-ulysses-sp4,sft-ring-sp2")
    rows = {r["case"]: r for r in compare([DEEPSPEED_ALST], cases, log=lambda m: None, pools={w: pools(w) for w in (2, 4)})}
    assert {k: r["verdict"] for k, r in rows.items()} == {"sft-ulysses-sp4": "pass", "packed-sft-ulysses-sp4": "wrong",
                                                          "sft-ring-sp2": "refused"}
    assert rows["packed-sft-ulysses-sp4"]["metrics"]["max_loss_rel_err"] > 1e-4
