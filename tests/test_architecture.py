"""Promises the tree makes about its own structure: layers, size, documentation, and what each command imports."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "spbench")
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports (relative imports resolved; `from x import y` counts y
    when y is a module)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_circle():
    graph, state, stack = _graph(), {}, []

    def visit(v: str) -> None:
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_runtime_never_imports_spbench():
    bad = {m: sorted(d for d in deps if d.startswith("spbench")) for m, deps in _graph().items()
           if m.startswith("runtime")}
    assert not {m: d for m, d in bad.items() if d}


def test_only_the_faults_command_imports_the_fault_package():
    """Fault injection lives at the edge: no check, runner or production path depends on it."""
    importers = {m for m, deps in _graph().items() if any(d.startswith("spbench.faults") for d in deps)}
    assert importers <= {"spbench.cli.faults", "spbench.faults", "spbench.faults.catalogue", "spbench.faults.variants"}


def test_modules_stay_readable_in_one_sitting():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_stay_short():
    long = [f"{m}.{n.name} ({n.end_lineno - n.lineno + 1})" for m, p in _modules().items()
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_readme_layout_names_every_module_and_only_real_ones():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    named: set[str] = set()
    folder = None
    for line in block.splitlines():
        if not line.strip():
            continue
        head = line.split("  ")[0] if not line.startswith(" ") else None
        if head is not None:
            folder = head.strip().rstrip("/")
            continue
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_/]*\.py", line):
            named.add(f"{folder}/{word}")
    actual = {str(p.relative_to(REPO)) for p in _modules().values() if p.name != "__init__.py"}
    missing, stale = actual - named, named - actual
    assert not missing and not stale, f"README Layout lacks {sorted(missing)}; names absent modules {sorted(stale)}"


@pytest.mark.parametrize("command", [["gate", "--baseline", "B", "--results", "B"], ["report", "B", "--out", "OUT"],
                                     ["--help"]])
def test_light_commands_start_without_torch(tmp_path, command):
    baseline = REPO / "spbench" / "suites" / "golden" / "ci.json"
    argv = [str(baseline) if a == "B" else str(tmp_path / "r") if a == "OUT" else a for a in command]
    script = ("import sys\nfrom spbench.cli import main\ntry:\n    code = main(%r)\nexcept SystemExit as e:\n"
              "    code = e.code\nassert 'torch' not in sys.modules, 'torch imported'\nprint('code', code)\n" % argv)
    if command[0] == "report":  # plots need matplotlib, not torch; keep the check about torch only
        script = "import sys\nsys.modules['matplotlib'] = None\n" + script
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "code 0" in r.stdout, r.stderr[-1500:]
