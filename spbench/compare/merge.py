"""Several `spbench compare` runs (each suite, each venv: ms-swift and verl pin other transformers) as one
spbench.compare/1 document that keeps every run's provenance and every adapter's package versions.

A merged document is a run document plus `runs`: one entry per input with its label, file, suite, provenance and
the implementations it ran; each row gets `suite` and `run` (the index into `runs`). An implementation that an
earlier run already has for the same suite, or with other package versions (spbench run again in the ms-swift venv
for a timing reference in that run), is renamed `name@label`, so every (implementation, case) pair stays unique:

    runs main (ci: spbench, deepspeed-alst), swift (ci: spbench, ms-swift-ulysses)
    → implementations spbench, deepspeed-alst, spbench@swift, ms-swift-ulysses

A merged document given as an input is taken apart into the runs it holds (`runs_of_merged`), each with its own
label, file, provenance, rows and the traced rows of its venv, so a report can be merged again (a new run added,
or traces re-made) without the runs' original files; the traced rows its merge made itself are dropped (trace
them again with --trace-memory).
"""
from __future__ import annotations

from pathlib import Path

from ..common.errors import UsageError
from ..common.schemas import COMPARE


def parse_input(text: str) -> tuple[str, str]:
    """`LABEL=PATH` or `PATH` (label: the file's folder name) → (label, path)."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = Path(text).resolve().parent.name, text
    if not label or not path or "@" in label:
        raise UsageError(f"--merge {text!r}: give LABEL=compare.json or compare.json (a label without '@')")
    return label, path


def merge(inputs: list[tuple[str, str, dict]], prov: dict) -> dict:
    """One document from (label, file, run document) triples, in order; `prov` is the merge's own provenance."""
    if not inputs:
        raise UsageError("--merge: give at least one compare.json")
    runs: list[dict] = []
    impls: dict[str, dict] = {}
    covered: set[tuple[str, str]] = set()  # (implementation key, suite) pairs already taken
    rows: list[dict] = []
    traced: dict[str, dict] = {}
    inputs = [run for label, path, doc in inputs for run in runs_of_merged(label, path, doc)]
    for index, (label, path, doc) in enumerate(inputs):
        if doc.get("schema") != COMPARE:
            raise UsageError(f"--merge {path}: not a `spbench compare` document (schema {COMPARE})")
        suite, names = doc["suite"], {}
        for name, info in doc["implementations"].items():
            key = _key(name, label, suite, info, impls, covered, path)
            names[name] = key
            impls.setdefault(key, {**info, "runs": []})["runs"].append(index)
            covered.add((key, suite))
        runs.append({"label": label, "file": str(path), "suite": suite, "provenance": doc["provenance"],
                     "implementations": list(names.values())})
        rows += [{**r, "impl": names[r["impl"]], "suite": suite, "run": index} for r in doc["rows"]]
        for impl, row in (doc.get("maxlen_traced") or {}).items():  # traced in that run's venv; the first run wins
            traced.setdefault(impl, {**row, "run": index})
    suites = list(dict.fromkeys(run["suite"] for run in runs))
    return {"schema": COMPARE, "suite": "+".join(suites), "provenance": prov, "runs": runs,
            "implementations": impls, "rows": rows, **({"maxlen_traced": traced} if traced else {})}


def runs_of_merged(label: str, path: str, doc: dict) -> list[tuple[str, str, dict]]:
    """(label, file, run document) of every run a merged document holds (module doc); a run document as it is."""
    if "runs" not in doc:
        return [(label, path, doc)]
    out = []
    for index, run in enumerate(doc["runs"]):
        name = {key: key.removesuffix(f"@{run['label']}") for key in run["implementations"]}
        rows = [{k: v for k, v in r.items() if k not in ("suite", "run")} | {"impl": name[r["impl"]]}
                for r in doc["rows"] if r["run"] == index]
        traced = {impl: {k: v for k, v in row.items() if k != "run"}
                  for impl, row in (doc.get("maxlen_traced") or {}).items() if row.get("run") == index}
        out.append((run["label"], run["file"], {
            "schema": doc["schema"], "suite": run["suite"], "provenance": run["provenance"],
            "implementations": {name[key]: {k: v for k, v in doc["implementations"][key].items() if k != "runs"}
                                for key in run["implementations"]},
            "rows": rows, **({"maxlen_traced": traced} if traced else {})}))
    return out


def _key(name, label, suite, info, impls, covered, path) -> str:
    for key in (name, f"{name}@{label}"):
        if key not in impls or (impls[key]["versions"] == info["versions"] and (key, suite) not in covered):
            return key
    raise UsageError(f"--merge {path}: {name} on suite {suite} is already in the documents before it, also as "
                     f"{name}@{label}; give this run another label (LABEL=compare.json)")


def runs_of(doc: dict) -> list[dict]:
    """A document's runs: its `runs`, or the one run a plain `spbench compare` document is."""
    return doc.get("runs") or [{"label": None, "file": None, "suite": doc.get("suite"), "provenance":
                                doc.get("provenance") or {}, "implementations": list(doc["implementations"])}]


def row_suite(doc: dict, row: dict) -> str:
    """The suite a row's case is from."""
    return row.get("suite") or doc.get("suite") or "?"
