"""nox sessions: `nox -l` lists them; extra arguments after `--` go to the underlying command."""
from __future__ import annotations

import shutil

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

# The local CPU build: a plain `torch` requirement would pull a multi-GB CUDA build on CPU machines.
CPU_TORCH = "torch==2.13.0"


def install(session: nox.Session, *extras: str) -> None:
    """torch first (CPU build unless this machine has an NVIDIA driver), then this project."""
    session.install(CPU_TORCH if shutil.which("nvidia-smi") is None else "torch")
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Lint (ruff) and run the test suite (CPU, gloo ranks). Example: nox -s tests -- -k ring -x"""
    install(session, "test")
    session.run("ruff", "check", ".")
    session.run("pytest", *session.posargs)


@nox.session
def parity(session: nox.Session) -> None:
    """Run the default parity suite (ci: tiny model, CPU ranks, float64); results and report in out/parity.

    Publish into the committed report with: nox -s parity -- --out reports/parity"""
    install(session)
    session.run("spbench", "parity", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU check on one H100/H200 within a time budget, with the machine's own torch. Example: nox -s gpu -- --dry-run

    Runs `spbench gpu-check` (attention, bf16 parity, plain vs ours probes: memory with the model's error, tokens/s, MB/token; the trainer
    on 2 emulated ranks; one maxlen probe); results in reports/gpu/. Needs the machine's CUDA torch, so no virtualenv is made."""
    session.run("python", "-m", "spbench", "gpu-check", "--out", "reports/gpu", *session.posargs)


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing: each planted bug of spbench/suites/mutants.toml must fail the ci parity suite or the
    attention check (tens of minutes; not in the default sessions). Example: nox -s mutants -- --only M03"""
    install(session)
    session.run("python", "-m", "spbench.check.mutants", *session.posargs)
