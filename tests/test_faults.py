"""The fault catalogue: every FAULTS.md bug, injected into the SP ranks, is caught; the clean runtime passes."""
from spbench.faults.catalogue import FAULTS, catalogue


def test_every_fault_is_caught_and_clean_runtime_passes():
    doc = catalogue(log=lambda *_: None)
    assert doc["clean_passed"], {k: v for k, v in doc["clean"].items() if not v["passed"]}
    missed = [f["id"] for f in doc["faults"] if not f["caught"]]
    assert not missed, missed
    assert [f["id"] for f in doc["faults"]] == [f.id for f in FAULTS] and len(FAULTS) == 15
