"""spbench.results: atomic writers, JSONL append, schema checks on load, provenance."""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess

import pytest

from spbench.check.tolerances import rel_errors
from spbench.common import results
from spbench.common.errors import UsageError
from spbench.common.results import append_jsonl, case_key, load_results, results_doc, write_json_atomic
from spbench.common.schemas import MAXLEN as MAXLEN_SCHEMA
from spbench.common.schemas import PARITY as SCHEMA


def _case(name: str = "sft-zigzag-sp2", passed: bool = True) -> dict:
    return {"name": name, "stage": "sft", "method": "zigzag", "sp": 2, "passed": passed, "error": None}


def test_write_json_atomic_round_trip_and_replace(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1.5, None]})
    assert json.loads(path.read_text()) == {"b": [1.5, None]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_atomic_failure_leaves_old_content_and_no_temp(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        write_json_atomic(path, {"big": list(range(10_000)), "bad": object()})
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_atomic_failure_creates_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"big": list(range(10_000)), "bad": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_interrupted_before_rename_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_append_jsonl_appends_whole_lines_only(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 0, "loss": 2.5})
    append_jsonl(path, {"step": 1, "loss": 2.25})
    with pytest.raises(TypeError):
        append_jsonl(path, {"step": 2, "loss": object()})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 0, "loss": 2.5},
                                                                            {"step": 1, "loss": 2.25}]


def test_load_results_accepts_valid_file(tmp_path):
    doc = results_doc("ci", [_case("a"), _case("b", passed=False)], {"git_sha": "abc"})
    assert doc["passed"] is False and doc["schema"] == SCHEMA
    write_json_atomic(tmp_path / "r.json", doc)
    assert load_results(tmp_path / "r.json") == doc


def test_results_doc_passed_needs_cases():
    assert results_doc("ci", [_case("a")], {})["passed"] is True
    assert results_doc("ci", [], {})["passed"] is False


def _usage_error(path, **kw) -> str:
    with pytest.raises(UsageError) as e:
        load_results(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_results_missing_file(tmp_path):
    msg = _usage_error(tmp_path / "nope.json")
    assert "nope.json does not exist" in msg


def test_load_results_invalid_json(tmp_path):
    (tmp_path / "r.json").write_text('{"schema": "spbench.results/1",\n "cases": [')
    assert "is not valid JSON (line 2" in _usage_error(tmp_path / "r.json")


@pytest.mark.parametrize("doc, found", [({"schema": "foo", "cases": []}, "has schema 'foo'"),
                                        ({"cases": []}, "has no 'schema' key"),
                                        ([1, 2], "holds a JSON list")])
def test_load_results_wrong_schema(tmp_path, doc, found):
    (tmp_path / "x.json").write_text(json.dumps(doc))
    msg = _usage_error(tmp_path / "x.json")
    assert found in msg and "'spbench.results/1'" in msg


def test_load_results_schema_choice(tmp_path):
    doc = {"schema": MAXLEN_SCHEMA, "provenance": {}, "rows": [{"model": "tiny", "max_len": 4096}]}
    write_json_atomic(tmp_path / "m.json", doc)
    assert "has schema 'spbench.maxlen/1', expected 'spbench.results/1'" in _usage_error(tmp_path / "m.json")
    assert load_results(tmp_path / "m.json", schemas=(SCHEMA, MAXLEN_SCHEMA)) == doc


@pytest.mark.parametrize("cases, found", [([_case("a"), _case("a")], "'a' appears twice"),
                                          ([{"name": "a"}], "case 0 needs a string 'name' and a boolean 'passed'"),
                                          ("nope", "'cases' must be a list of objects")])
def test_load_results_bad_cases(tmp_path, cases, found):
    write_json_atomic(tmp_path / "r.json", {"schema": SCHEMA, "cases": cases})
    assert found in _usage_error(tmp_path / "r.json")


def test_case_key():
    assert case_key(_case("dpo-ring-sp4")) == "dpo-ring-sp4"


def test_rel_errors():
    errs = rel_errors([1.0, 2.2, math.nan, math.nan, 5.0], [1.0, 2.0, math.nan, 1.0, math.inf])
    # one rule everywhere (parity, gate, report): a NaN never matches, not even another NaN
    assert errs[0] == 0.0 and errs[1] == pytest.approx(0.1) and errs[2] == math.inf
    assert errs[3] == math.inf and errs[4] == math.inf
    with pytest.raises(ValueError):
        rel_errors([1.0], [1.0, 2.0])


def test_provenance_fields(monkeypatch):
    calls, real_run = [], subprocess.run

    def fake_run(cmd, **kw):
        if cmd[0] != "git":  # platform.processor() may run `uname -p`
            return real_run(cmd, **kw)
        calls.append(cmd)
        out = "deadbeef\n" if "rev-parse" in cmd else " M runtime/x.py\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(results.subprocess, "run", fake_run)
    prov = results.provenance("spbench parity --suite ci", "gloo", 4, 7, wall_time_s=1.5)
    assert prov["git_sha"] == "deadbeef" and prov["git_dirty"] is True
    assert calls == [["git", "rev-parse", "HEAD"], ["git", "--no-optional-locks", "status", "--porcelain"]]
    assert (prov["backend"], prov["world"], prov["seed"], prov["wall_time_s"]) == ("gloo", 4, 7, 1.5)
    assert prov["command"] == "spbench parity --suite ci"
    assert prov["torch"][0].isdigit() and prov["python"].count(".") == 2
    assert prov["device"]  # CUDA name, or "<cpu> (N cores)"
    date = datetime.datetime.fromisoformat(prov["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert set(prov) == {"git_sha", "git_dirty", "python", "torch", "transformers", "deepspeed", "device",
                         "hostname", "backend", "world", "seed", "date", "command", "wall_time_s"}


def test_provenance_without_git(monkeypatch):
    real_run = subprocess.run

    def no_git(cmd, **kw):
        if cmd[0] != "git":
            return real_run(cmd, **kw)
        raise FileNotFoundError("git")

    monkeypatch.setattr(results.subprocess, "run", no_git)
    prov = results.provenance("x", "gloo", 1, 0)
    assert prov["git_sha"] == "unknown" and prov["git_dirty"] is None and prov["wall_time_s"] is None


def test_version_of_missing_package():
    assert results._version("surely-not-an-installed-dist-xyz") == "not installed"


def test_results_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
