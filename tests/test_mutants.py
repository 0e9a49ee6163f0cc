"""The mutant list stays applicable (each edit hits exactly one place and leaves valid Python), and the harness
applies what it says; running the mutants is `nox -s mutants` (minutes), not part of the test suite."""
from __future__ import annotations

import pytest

from spbench.check.mutants import Mutant, checkout, copy_packages, load_mutants, mutated

MUTANTS = load_mutants()


def test_at_least_twenty_mutants_over_the_runtime_files():
    files = {m.file for m in MUTANTS}
    assert len(MUTANTS) >= 20 and len({m.id for m in MUTANTS}) == len(MUTANTS)
    assert {"runtime/data.py", "runtime/layout.py", "runtime/attention/blockattn.py", "runtime/attention/ring.py",
            "runtime/attention/ulysses.py", "runtime/comm.py", "runtime/losses.py", "runtime/train.py"} <= files


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_applies_once_and_compiles(mutant):
    text = (checkout() / mutant.file).read_text(encoding="utf-8")
    new = mutated(text, mutant)
    assert new != text and mutant.why
    compile(new, mutant.file, "exec")


def test_a_stale_mutant_is_an_error_not_a_silent_survivor():
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutated("x = 1\n", Mutant("M00", "f.py", "y = 2", "y = 3", "gone"))
    with pytest.raises(ValueError, match="occurs 2 times"):
        mutated("a\na\n", Mutant("M00", "f.py", "a", "b", "twice"))


def test_the_copy_carries_the_mutant_and_only_it(tmp_path):
    m = MUTANTS[0]
    copy_packages(tmp_path, m)
    src = checkout()
    assert (tmp_path / m.file).read_text(encoding="utf-8") == mutated((src / m.file).read_text(encoding="utf-8"), m)
    other = "runtime/topology.py" if m.file != "runtime/topology.py" else "runtime/comm.py"
    assert (tmp_path / other).read_text(encoding="utf-8") == (src / other).read_text(encoding="utf-8")
