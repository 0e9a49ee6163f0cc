"""Transformers models with the SP attention registered vs the same model with its own SDPA attention."""
import pytest
import torch
from rankjobs import hf_inputs, hf_logits_and_grads

from runtime.attention import METHODS, resolve_ulysses, shard_plan
from runtime.models import build_model

SEQ = 37  # divisible by no SP size


def reference(model_name: str):
    model = build_model(model_name, torch.float64, "sdpa", seed=0)  # eager softmaxes in float32
    ids, w = hf_inputs(model.config.vocab_size, SEQ)
    logits = model(input_ids=ids).logits
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("method", METHODS)
def test_model_logits_and_grads_match_single_process(pools, model_name, method):
    sp = 2 if method == "ulysses" else 4  # tiny has 2 kv heads and 4 heads: Ulysses also runs at sp 4 (kv replicated)
    for sp in sorted({sp, 4 if method == "ulysses" else sp}):
        ref_logits, ref_grads = reference(model_name)
        per_rank = pools(4).run(hf_logits_and_grads, model_name, method, sp, SEQ)
        u = resolve_ulysses(method, sp, 4, 2)
        plan = shard_plan(method, SEQ, sp, u)
        logits = plan.unshard([r[0] for r in per_rank[:sp]]).narrow(1, 0, SEQ)
        assert (logits - ref_logits).abs().max() < 1e-10
        grads = per_rank[0][1]
        worst = max(((grads[n] - g).abs().max().item() / max(1.0, g.abs().max().item()), n) for n, g in ref_grads.items())
        assert worst[0] < 1e-10, worst
