"""The results files spbench writes, their provenance, and atomic writers.

Parity results, schema ``spbench.results/1`` (one file per suite run)::

    {"schema": "spbench.results/1",
     "suite": "ci",              # suite name, or "adhoc" for a single command-line case
     "passed": true,             # every case passed
     "provenance": {             # see provenance()
        "git_sha": "4b06979…" | "unknown", "git_dirty": false | true | null,
        "python": "3.12.3", "torch": "2.13.0+cpu", "transformers": "5.24.0", "deepspeed": "not installed",
        "device": "NVIDIA H200 x1" | "x86_64 (16 cores)", "hostname": "box",
        "backend": "gloo", "world": 4, "seed": 0, "date": "2026-11-02T10:00:00+00:00" (UTC, ISO 8601),
        "command": "spbench parity --suite ci", "wall_time_s": 12.5 | null},
     "cases": [{
        "name": "sft-zigzag-sp4",                    # unique within the file; case_key() matches files on it
        "stage": "sft" | "dpo", "pref_loss": "sigmoid" | null,   # pref_loss: DPO loss variant, null for SFT
        "method": "zigzag", "sp": 4, "dp": 1, "ga": 2,           # SP strategy and degrees, grad accumulation
        "dtype": "float64", "packing": false, "model": "tiny", "steps": 3, "zero": 0,
        "offload": "none",                           # CPU offload under ZeRO: none | optimizer | optimizer,param
        "passed": true,
        "error": null,                               # one-line message when the case crashed or timed out
                                                     # (then passed is false and the curves may be empty)
        "tolerance": {"loss": 1e-8, "grad": 1e-8},   # relative tolerances the case was judged with
        "metrics": {"max_loss_rel_err": 1e-15,       # max over steps of |sp - ref| / |ref|
                    "max_grad_norm_rel_err": 1e-15,  # same for the global gradient norm
                    "max_param_grad_rel_err": 1e-14, # worst single parameter gradient
                    "worst_param": "model.layers.0.self_attn.q_proj.weight",
                    "max_dpo_rel_err": null},        # DPO only: chosen/rejected log-prob ratios
        "failures": ["loss step 2: rel err 3e-3 > 1e-8"],  # human readable, [] when passed
        "ref_losses": [...], "sp_losses": [...],           # per optimizer step; ref = same run with SP off
        "ref_grad_norms": [...], "sp_grad_norms": [...],
        "wall_s": 1.2}]}

Max-length results, schema ``spbench.maxlen/1``::

    {"schema": "spbench.maxlen/1", "provenance": {...as above...},
     "rows": [{"model": "qwen2.5-7b", "stage": "sft", "gpus": 8, "gpu_mem_gib": 80, "sp": 8, "zero": 3,
               "offload": false, "max_len": 131072 | null, "source": "measured" | "estimated",
               "peak_gib": 71.3, ...}]}

Floats that are NaN or infinite (a diverged loss) are written as Python's json writes them (NaN, Infinity).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path

from .errors import UsageError
from .schemas import ENTRIES, PARITY


def provenance(command: str, backend: str, world: int, seed: int, wall_time_s: float | None = None) -> dict:
    """Where and how a result was produced: git state, library versions, device, run settings."""
    sha = _git("rev-parse", "HEAD")
    status = _git("--no-optional-locks", "status", "--porcelain")  # no index lock: others may be committing
    return {
        "git_sha": sha or "unknown",
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),  # metadata only: importing deepspeed takes seconds
        "device": _device(),
        "hostname": socket.gethostname(),
        "backend": backend,
        "world": world,
        "seed": seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "wall_time_s": wall_time_s,
    }


def _git(*args: str) -> str | None:
    """stdout of a read-only git command in this file's repository, or None if git or the repo is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device() -> str:
    import torch  # here, not at import time: report and gate do not need torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.processor() or platform.machine() or 'cpu'} ({os.cpu_count()} cores)"


def results_doc(suite: str, cases: list[dict], prov: dict) -> dict:
    """A ``spbench.results/1`` document; it passed when it has cases and every case passed."""
    return {"schema": PARITY, "suite": suite, "passed": bool(cases) and all(c["passed"] for c in cases),
            "provenance": prov, "cases": cases}


def case_key(case: dict) -> str:
    """The key that matches a case between two results files: its name."""
    return case["name"]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and os.replace: never a half-written file."""
    _atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically: if serialising fails, `path` is left as it was."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """`folder`, created if needed, after a write test: UsageError (one line) now instead of a traceback after the
    work (a read-only or misspelt output path). `what` names the flag or key in the message."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"{what} {str(path)!r} is not a writable folder ({e.strerror}); give another path") from None
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def append_jsonl(path: str | os.PathLike, obj) -> None:
    """Append `obj` as one JSON line, flushed and fsynced, for logs that must survive a crash line by line. A last
    line torn by an earlier crash (no newline) is closed first, so the new record starts a line of its own."""
    line = json.dumps(obj) + "\n"  # serialise first: a failure writes nothing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL log, skipping lines that do not parse (a line torn by a crash)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (the convention of every spbench --json output)."""
    for line in reversed((text or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def load_results(path: str | os.PathLike, schemas: tuple[str, ...] = (PARITY,)) -> dict:
    """Read a results file and check its schema is one of `schemas`; any problem → UsageError, one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"results file {path} does not exist; check the path") from None
    except OSError as e:
        raise UsageError(f"cannot read results file {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"results file {path} is not valid JSON (line {e.lineno}: {e.msg}); "
                         f"was the run interrupted?") from None
    if not isinstance(data, dict):
        raise UsageError(f"results file {path} holds a JSON {type(data).__name__}, expected an object "
                         f"with \"schema\": {' or '.join(map(repr, schemas))}")
    schema = data.get("schema")
    if schema not in schemas:
        found = "no 'schema' key" if schema is None else f"schema {schema!r}"
        raise UsageError(f"results file {path} has {found}, expected {' or '.join(map(repr, schemas))}")
    _check_entries(path, data, ENTRIES[schema])
    return data


def _check_entries(path: Path, data: dict, key: str) -> None:
    entries = data.get(key)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f"results file {path}: {key!r} must be a list of objects")
    if key != "cases":
        return
    seen = set()
    for i, case in enumerate(entries):
        if not isinstance(case.get("name"), str) or not isinstance(case.get("passed"), bool):
            raise UsageError(f"results file {path}: case {i} needs a string 'name' and a boolean 'passed'")
        if case["name"] in seen:
            raise UsageError(f"results file {path}: case name {case['name']!r} appears twice; names must be unique")
        seen.add(case["name"])
        _check_case_values(path, case)


CURVES = ("ref_losses", "sp_losses", "ref_grad_norms", "sp_grad_norms")


def _check_case_values(path: Path, case: dict) -> None:
    """Curves are lists of numbers and metrics an object: anything else is unusable input, never a 'regression'."""
    for key in CURVES:
        curve = case.get(key, [])
        if not isinstance(curve, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in curve):
            raise UsageError(f"results file {path}: case {case['name']!r}: {key} must be a list of numbers, got "
                             f"{str(curve)[:60]!r}")
    if not isinstance(case.get("metrics", {}), dict):
        raise UsageError(f"results file {path}: case {case['name']!r}: metrics must be an object")

