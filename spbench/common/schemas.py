"""Every JSON document spbench writes, by schema name (the fields are documented where each is built)."""

PARITY = "spbench.results/1"
"""`spbench parity` results, one file per suite run (common/results.py documents the fields)."""
MAXLEN = "spbench.maxlen/1"
"""`spbench maxlen` rows (memory/maxlen.py)."""
MAXLEN_PROBE = "spbench.maxlen.probe/1"
"""One line of <out>/probes.jsonl of a measured max-length search (memory/search.py)."""
MAXLEN_SUITE = "spbench.maxlen-suite/1"
"""A max-length suite TOML (spbench/suites/maxlen-*.toml)."""
GPU_CHECK = "spbench.gpu-check/1"
"""`spbench gpu-check` document (gpu/results.py)."""
PROBE = "spbench.probe/1"
"""The JSON line of `python -m spbench.memory.probe` / `spbench.memory.distprobe`."""
MEMTRACE = "spbench.memtrace/1"
"""The JSON line of `python -m spbench.memory.trace`."""
MEASUREMENTS = "spbench.measurements/1"
"""Stored GPU measurements the memory model is checked against (reports/measurements/)."""

MUTANTS = "spbench.mutants/1"
"""The mutant list (spbench/suites/mutants.toml) and the results of `python -m spbench.check.mutants`."""

ENTRIES = {PARITY: "cases", MAXLEN: "rows", GPU_CHECK: "steps"}
"""The list each results schema that `spbench report` reads holds its entries in."""
