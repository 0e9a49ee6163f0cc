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


def compare_adapter(session: nox.Session, impl: str, extra: str) -> None:
    """One adapter in a venv of its own: torch (CPU build as `install`), this project with [test] and the adapter's
    extra (the package and the transformers it pins); its adapter tests, then `spbench compare --impl spbench,IMPL
    --suite ci` (spbench in the same run: the timing reference, and the runtime on that transformers)."""
    install(session, "test", extra)
    session.run("pytest", f"tests/test_compare_{extra}.py", "-q")
    session.run("spbench", "compare", "--impl", f"spbench,{impl}", "--suite", "ci", "--out", f"out/compare-{extra}",
                *session.posargs)


@nox.session(name="compare-swift")
def compare_swift(session: nox.Session) -> None:
    """ms-swift's Ulysses attention through the ci suite (its own venv: ms-swift pins transformers < 5.20); results in
    out/compare-swift. Example: nox -s compare-swift -- --case sft-ulysses-sp2"""
    compare_adapter(session, "ms-swift-ulysses", "swift")


@nox.session(name="compare-verl")
def compare_verl(session: nox.Session) -> None:
    """verl's Ulysses (its flash-attention patch, and its all-to-alls around SDPA) through the ci suite (its own
    venv: verl pins transformers < 5.11); results in out/compare-verl. Example: nox -s compare-verl -- --case sft-ulysses-sp4"""
    compare_adapter(session, "verl-ulysses,verl-ulysses-sdpa", "verl")
