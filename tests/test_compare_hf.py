"""Hugging Face's own SP path (transformers Trainer + accelerate ParallelismConfig(sp_size) → DeepSpeed ALST) on
gloo CPU ranks, through the harness: it runs, and the harness says how it differs from SP off."""
from __future__ import annotations

import pytest

from spbench.check.cases import Case, load_suite, select
from spbench.compare.hf_accelerate import HF_ACCELERATE_SP, step_order
from spbench.compare.run import compare

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_order_feeds_the_adapter_the_reference_order():
    assert step_order(list("abcde"), 2, 0) == list("ace") and step_order(list("abcde"), 2, 1) == list("bde")
    assert step_order(list("abcd"), 4, 3) == ["d"]


def test_hf_trainer_sp_verdicts(pools):
    """ZeRO 0 (no ZeRO file): DeepSpeed refuses float64 gradients on CPU, in its own words. ZeRO-2: HF's path runs
    and is wrong: its grad norm is SP × SP off's (each SP rank back-propagates the whole all-gathered loss;
    4 × at SP 4 measured by hand), its loss is float32 (transformers' loss upcasts logits with .float(), a float64 model included)."""
    zero2 = Case(name="zero2-sft-ulysses-sp2", stage="sft", method="ulysses", sp=2, zero=2, ga=1, steps=2)
    cases = [*select(load_suite("ci")[1], "sft-ulysses-sp2,sft-ring-sp2"), zero2]
    rows = {r["case"]: r for r in compare([HF_ACCELERATE_SP], cases, log=lambda m: None, pools={2: pools(2)})}
    assert rows["sft-ring-sp2"]["verdict"] == "refused" and "Ulysses" in rows["sft-ring-sp2"]["cause"]
    plain = rows["sft-ulysses-sp2"]
    assert plain["verdict"] == "refused"
    assert plain["cause"] == "AssertionError: attempting to reduce an unsupported grad type: torch.float64"
    ran = rows["zero2-sft-ulysses-sp2"]
    assert ran["verdict"] == "wrong" and "grad_norm step 0" in ran["cause"], ran["cause"]
    assert abs(ran["metrics"]["max_grad_norm_rel_err"] - (2 - 1)) < 1e-6  # |2g − g| / g at SP 2
    assert 1e-9 < ran["metrics"]["max_loss_rel_err"] < 1e-3 and ran["sp_wall_s"] > 0
