"""`python -m spbench.check.mutants` (`nox -s mutants`): how strong the checks are, measured by planted bugs.

Each mutant of spbench/suites/mutants.toml is one small edit of runtime/ (an offset, a sign, a slice, a group, a
reduction, a cast) that changes behaviour. It is applied to a temporary copy of the packages, and the checks run
against the copy in fresh processes: the ci parity suite (stopping at its first failing case), then, if that
passed, the attention check of every strategy. A mutant some check fails on is killed; one every check passes
is a survivor — a missing case, or an equivalent mutant to drop from the list with the reason. The clean copy
must pass every check first. Results: <out>/mutants.json (provenance inside); exit 1 when a mutant survives.

    python -m spbench.check.mutants                 # every mutant (tens of minutes on 2 cores)
    python -m spbench.check.mutants --only M03,M11 --out out/mutants
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tomllib

from ..common.schemas import MUTANTS as SCHEMA

ATTENTION_CHECKS = [  # strategy, GQA below the SP size, packed documents crossing shards, an odd length
    ["--method", m, "--sp", "4", "--heads", "8", "--kv-heads", "2", "--seq", "203", "--head-dim", "8",
     "--docs", "70,50,83", *(["--ulysses", "2"] if m == "hybrid" else [])]
    for m in ("ulysses", "ring", "zigzag", "hybrid", "allgather")
] + [["--method", "zigzag", "--sp", "2", "--heads", "4", "--kv-heads", "4", "--seq", "61", "--head-dim", "8",
      "--kernel", "cpu-flash-split", "--docs", "30,31"]]


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace the one occurrence of `find` in `file` (relative to the checkout) by `replace`."""

    id: str
    file: str
    find: str
    replace: str
    why: str


def load_mutants() -> list[Mutant]:
    """The mutants shipped in spbench/suites/mutants.toml."""
    doc = tomllib.loads(resources.files("spbench").joinpath("suites", "mutants.toml").read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"mutants.toml: schema must be {SCHEMA!r}")
    return [Mutant(**m) for m in doc["mutants"]]


def mutated(text: str, mutant: Mutant) -> str:
    """`text` with the mutant applied; ValueError unless `find` occurs exactly once (the list went stale)."""
    n = text.count(mutant.find)
    if n != 1:
        raise ValueError(f"mutant {mutant.id}: {mutant.find!r} occurs {n} times in {mutant.file}, not once")
    return text.replace(mutant.find, mutant.replace, 1)


def checkout() -> Path:
    """The folder holding the runtime and spbench packages this process imports."""
    import runtime

    return Path(runtime.__file__).resolve().parents[1]


def copy_packages(dest: Path, mutant: Mutant | None) -> None:
    """runtime/ and spbench/ copied into `dest`, with `mutant` applied (None: the clean copy)."""
    src = checkout()
    for pkg in ("runtime", "spbench"):
        shutil.copytree(src / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if mutant is not None:
        path = dest / mutant.file
        path.write_text(mutated(path.read_text(encoding="utf-8"), mutant), encoding="utf-8")


def _spbench(site: Path, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # the copy shadows the installed packages, in every rank too
    return subprocess.run([sys.executable, "-m", "spbench", *argv], cwd=site, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_checks(site: Path, timeout: float) -> tuple[str | None, str]:
    """(the first check that failed, or None; its detail) for the packages in `site`."""
    done = _spbench(site, ["parity", "--suite", "ci", "--fail-fast", "--out", str(site / "parity")], timeout)
    if done.returncode != 0:
        try:
            cases = json.loads((site / "parity" / "ci.json").read_text())["cases"]
            bad = next(c for c in cases if not c["passed"])
            return f"parity:{bad['name']}", (bad["error"] or "; ".join(bad["failures"][:1]))[:200]
        except (OSError, ValueError, KeyError, StopIteration):
            return "parity", (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    for argv in ATTENTION_CHECKS:
        done = _spbench(site, ["check-attention", *argv, "--json"], timeout)
        if done.returncode != 0:
            tail = (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or [""])[-1]
            return f"attention:{argv[1]}" + ("-split" if "cpu-flash-split" in argv else ""), tail[:200]
    return None, "every check passed"


def run_mutant(mutant: Mutant | None, timeout: float) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spbench-mutant-") as tmp:
        copy_packages(Path(tmp), mutant)
        try:
            by, detail = run_checks(Path(tmp), timeout)
        except subprocess.TimeoutExpired:
            by, detail = "timeout", f"a check ran past {timeout:g} s"  # a hang is a failure the suite shows
    return {"id": mutant.id if mutant else "clean", "file": mutant.file if mutant else None,
            "why": mutant.why if mutant else None, "killed": by is not None, "by": by, "detail": detail,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spbench.check.mutants", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated mutant ids (prefixes like M03 match)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=900, help="seconds per check before it counts as failed")
    p.add_argument("--out", default="out/mutants", help="folder for mutants.json (default out/mutants)")
    args = p.parse_args(argv)
    mutants = load_mutants()
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    mutants = [m for m in mutants if not wanted or any(m.id.startswith(w) for w in wanted)]
    if args.list or not mutants:
        print("\n".join(f"{m.id:<34} {m.file:<34} {m.why}" for m in mutants) or f"no mutant matches {args.only!r}")
        return 0 if mutants else 2
    return report([run_mutant(None, args.timeout)], mutants, args)


def report(rows: list[dict], mutants: list[Mutant], args) -> int:
    from ..common.results import provenance, write_json_atomic

    t0 = time.perf_counter()
    if rows[0]["killed"]:
        print(f"mutants: the clean copy fails {rows[0]['by']}: {rows[0]['detail']}", file=sys.stderr)
        return 1
    for i, m in enumerate(mutants, 1):
        rows.append(run_mutant(m, args.timeout))
        r = rows[-1]
        print(f"[{i:>2}/{len(mutants)}] {'killed' if r['killed'] else 'SURVIVED':<8} {m.id:<34} "
              f"by {r['by'] or '-'} ({r['wall_s']:.0f} s)", flush=True)
    survivors = [r["id"] for r in rows[1:] if not r["killed"]]
    print(f"mutants: {len(mutants) - len(survivors)}/{len(mutants)} killed; survivors: {', '.join(survivors) or 'none'}")
    prov = provenance(" ".join(["python -m spbench.check.mutants", *sys.argv[1:]]), "gloo", 4, 0,
                      round(time.perf_counter() - t0, 1))
    write_json_atomic(Path(args.out) / "mutants.json", {"schema": SCHEMA, "provenance": prov, "mutants": rows,
                                                        "survivors": survivors})
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
