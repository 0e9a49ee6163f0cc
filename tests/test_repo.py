"""Promises the repository makes about itself: CI runs exactly the README's test command."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_the_main_job_and_the_tests():
    main, tests = _readme_commands()[:2]
    assert main.endswith("nox -s parity") and tests.endswith("nox -s tests")


def test_ci_runs_the_readme_test_command_exactly():
    tests = _readme_commands()[1]
    ci = [line.strip() for line in (REPO / ".ci/run").read_text(encoding="utf-8").splitlines()]
    assert tests in ci


def _cell(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_readme_key_tables_are_the_configs_own():
    """The README's config-key table lists every TrainConfig field with its default and doc, in order, and the
    'Coming from LLaMA-Factory' table every row of runtime/lf.py's key table."""
    import dataclasses

    from runtime.config import TrainConfig
    from runtime.lf import key_table

    text = (REPO / "README.md").read_text(encoding="utf-8")
    rows = [f"| `{f.name}` | {_cell(f.default)} | {f.metadata['doc'].replace(' | ', ' / ')} |"
            for f in dataclasses.fields(TrainConfig)]
    assert "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n\n" in text
    lf = [f"| `{k}` | {what} | {note} |" for k, what, note in key_table()]
    assert "| LLaMA-Factory key | spbench | how |\n|---|---|---|\n" + "\n".join(lf) + "\n\n" in text
