"""Suite files: TOML shipped inside the package (spbench/suites/), found by name, or any path a user gives."""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

import tomllib

from .errors import UsageError


def shipped(prefix: str = "") -> dict[str, object]:
    """Name → resource of the suites shipped with spbench whose names start with `prefix`."""
    folder = resources.files("spbench").joinpath("suites")
    return {p.name.removesuffix(".toml"): p for p in folder.iterdir()
            if p.name.endswith(".toml") and p.name.startswith(prefix)}


def read_suite(name: str, kind: str, exclude_prefix: tuple[str, ...] = (), prefix: str = "") -> tuple[str, dict]:
    """(where it was read from, the parsed TOML) of a shipped suite `name` or a .toml path; UsageError, one line,
    when it does not exist or does not parse. `kind` names the suite in messages ("parity", "maxlen")."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{kind} suite file {name!r} does not exist; give a .toml path or a shipped suite name "
                             f"({', '.join(_names(exclude_prefix, prefix))})")
        source, text = str(path), path.read_text(encoding="utf-8")
    else:
        table = {k: v for k, v in shipped(prefix).items() if not k.startswith(exclude_prefix or ())}
        if name not in table:
            near = difflib.get_close_matches(name, table, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UsageError(f"no {kind} suite {name!r}; {hint}available: {', '.join(sorted(table))} (or a .toml path)")
        source, text = f"spbench/suites/{name}.toml", table[name].read_text(encoding="utf-8")
    try:
        return source, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{kind} suite {source} is not valid TOML: {e}") from None


def _names(exclude_prefix: tuple[str, ...], prefix: str) -> list[str]:
    return sorted(k for k in shipped(prefix) if not k.startswith(exclude_prefix or ()))


def golden(name: str) -> Path:
    """Path of the committed golden results of a shipped suite (spbench/suites/golden/NAME.json)."""
    return Path(str(resources.files("spbench").joinpath("suites", "golden", f"{name}.json")))
