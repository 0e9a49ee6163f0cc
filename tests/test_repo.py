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
