"""Memory features are exact: same loss and gradients of every parameter as without them (float64, tiny Qwen2)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.losses import IGNORE, sft_loss, token_logprobs
from runtime.memory import (
    AUTO,
    MemoryFeatures,
    TiledMLP,
    apply_tiled_mlp,
    checkpoint_offload,
    enable_gradient_checkpointing,
    forward_context,
    mlp_chunks_for,
    prepare_model,
    remove_tiled_mlp,
    resolve_mlp_chunks,
)
from runtime.models import build_model

RTOL, ATOL = 1e-10, 1e-12  # float64: only summation-order rounding may differ


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    model = build_model("tiny", torch.float64, "sdpa", seed=0)
    model.train()
    return model


def _batch(b: int, s: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (b, s), generator=g)
    targets = torch.randint(0, 512, (b, s), generator=g)
    targets[:, : s // 4] = IGNORE  # an unsupervised prompt
    return ids, targets


def _step(model, ids, targets, features: MemoryFeatures | None = None):
    """Loss and {param name: grad} of one SFT step (decoder forward under the features' context)."""
    model.zero_grad(set_to_none=True)
    ctx = forward_context(features) if features else forward_context(MemoryFeatures.plain())
    with ctx as stats:
        hidden = model.model(input_ids=ids).last_hidden_state  # [b, s, h]
    chunk = features.tiled_loss_chunk if features else None
    logp = token_logprobs(hidden, model.lm_head, targets, chunk_tokens=chunk)
    loss = sft_loss(logp, targets, int((targets != IGNORE).sum()))
    loss.backward()
    # TiledMLP shows as `.mlp.mlp.` in named_parameters (state_dict keys are unchanged)
    grads = {n.replace(".mlp.mlp.", ".mlp."): p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, stats


def _assert_same(ref, got):
    loss_r, grads_r, _ = ref
    loss_g, grads_g, _ = got
    torch.testing.assert_close(loss_g, loss_r, rtol=RTOL, atol=ATOL)
    assert grads_r.keys() == grads_g.keys()
    for name in grads_r:
        assert grads_r[name].abs().sum() > 0 or name.endswith("bias"), f"{name}: zero gradient, test is vacuous"
        torch.testing.assert_close(grads_g[name], grads_r[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("chunks,seq", [(3, 37), (4, 64), (8, 5), (1, 16)])
@pytest.mark.parametrize("ckpt", [False, True])
def test_tiled_mlp_parity(base, chunks, seq, ckpt):
    ids, targets = _batch(2, seq)
    ref = _step(base, ids, targets)
    model = copy.deepcopy(base)
    if ckpt:
        enable_gradient_checkpointing(model)
    assert apply_tiled_mlp(model, chunks) == model.config.num_hidden_layers
    calls = []
    inner = model.model.layers[0].mlp.mlp
    handle = inner.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[-2]))
    _assert_same(ref, _step(model, ids, targets))
    handle.remove()
    # forward: exactly `chunks` calls covering the sequence; backward recomputes each chunk once, in order,
    # and nothing else: the layer recompute (checkpointing) stops at the MLP's input, before any chunk
    assert sum(calls[:chunks]) == seq and len(calls[:chunks]) == chunks
    assert calls == calls[:chunks] * 2, calls


def test_tiled_mlp_wrong_order_is_caught(base):
    """The parity check is sensitive: a tiled MLP that reorders chunks must fail it."""

    class Reversed(TiledMLP):
        def forward(self, x):
            out = super().forward(x)
            return torch.cat(torch.tensor_split(out, self.num_chunks, dim=-2)[::-1], dim=-2)

    ids, targets = _batch(1, 12)
    ref = _step(base, ids, targets)
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        layer.mlp = Reversed(layer.mlp, 3)
    with pytest.raises(AssertionError):
        _assert_same(ref, _step(model, ids, targets))


def test_tiled_mlp_no_grad_reference_forward(base):
    ids, _ = _batch(2, 29)
    model = copy.deepcopy(base)
    apply_tiled_mlp(model, 5)
    with torch.no_grad():
        a = base.model(input_ids=ids).last_hidden_state
        b = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_apply_and_remove_tiled_mlp(base):
    model = copy.deepcopy(base)
    apply_tiled_mlp(model, 2)
    apply_tiled_mlp(model, 6)  # re-applying updates the count, never double-wraps
    assert all(isinstance(l.mlp, TiledMLP) and l.mlp.num_chunks == 6 and not isinstance(l.mlp.mlp, TiledMLP)
               for l in model.model.layers)
    # checkpoints keep plain transformers keys, and load back into the tiled model
    assert list(model.state_dict()) == list(base.state_dict())
    fresh = build_model("tiny", torch.float64, "sdpa", seed=1)
    apply_tiled_mlp(fresh, 3)
    fresh.load_state_dict(base.state_dict())
    assert torch.equal(fresh.model.layers[1].mlp.mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    assert remove_tiled_mlp(model) == 2
    assert not any(isinstance(m, TiledMLP) for m in model.modules())
    with pytest.raises(ValueError, match="num_chunks"):
        TiledMLP(torch.nn.Identity(), 0)
    with pytest.raises(ValueError, match="mlp"):
        apply_tiled_mlp(torch.nn.Linear(2, 2), 2)


def test_checkpoint_offload_parity_and_hooks_run(base):
    ids, targets = _batch(2, 40)
    ref = _step(base, ids, targets)
    model = copy.deepcopy(base)
    enable_gradient_checkpointing(model)
    features = MemoryFeatures(tiled_loss_chunk=None, tiled_mlp_chunks=None, checkpoint_offload=True,
                              gradient_checkpointing=True)
    got = _step(model, ids, targets, features)
    _assert_same(ref, got)
    stats = got[2]
    h = model.config.hidden_size
    # every decoder layer's checkpointed input [b, s, h] went through the pack hook, and came back in backward
    layer_inputs = [s for s in stats.shapes if s == (2, 40, h)]
    assert len(layer_inputs) >= model.config.num_hidden_layers
    assert stats.unpacked == stats.packed > 0
    assert stats.bytes >= model.config.num_hidden_layers * 2 * 40 * h * 8


def test_checkpoint_offload_without_checkpointing_offloads_more(base):
    """Sanity of the counter: without checkpointing every saved activation goes through the hooks."""
    ids, _ = _batch(1, 16)
    model = copy.deepcopy(base)
    enable_gradient_checkpointing(model)
    with checkpoint_offload(pin_memory=False) as with_ckpt:
        model.model(input_ids=ids).last_hidden_state.sum().backward()
    with checkpoint_offload(pin_memory=False) as without:
        base.model(input_ids=ids).last_hidden_state.sum().backward()
    assert without.packed > 3 * with_ckpt.packed


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_tiled_loss_equals_untiled(base, chunk):
    ids, targets = _batch(2, 33)
    hidden = base.model(input_ids=ids).last_hidden_state.detach()
    out = {}
    for name, c in (("untiled", None), ("tiled", chunk)):
        h = hidden.clone().requires_grad_(True)
        base.lm_head.zero_grad(set_to_none=True)
        logp = token_logprobs(h, base.lm_head, targets, chunk_tokens=c)
        logp.sum().backward()
        out[name] = (logp.detach(), h.grad, base.lm_head.weight.grad.clone())
    for a, b in zip(out["tiled"], out["untiled"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert (out["untiled"][0][targets == IGNORE] == 0).all()


def test_all_features_together(base):
    ids, targets = _batch(2, 50)
    ref = _step(base, ids, targets)
    model = copy.deepcopy(base)
    features = MemoryFeatures(tiled_loss_chunk=16, tiled_mlp_chunks=AUTO, checkpoint_offload=True)
    prepare_model(model, features, shard_tokens=2 * 50, hidden_size=model.config.hidden_size)
    assert model.model.layers[0].mlp.num_chunks == mlp_chunks_for(100, 64) == 2
    assert model.is_activation_checkpointing
    _assert_same(ref, _step(model, ids, targets, features))
    prepare_model(model, MemoryFeatures(tiled_mlp_chunks=None), 100, 64)  # turning the feature off unwraps
    assert not any(isinstance(m, TiledMLP) for m in model.modules())


def test_memory_features_validation():
    assert MemoryFeatures().tiled_mlp_chunks == AUTO and MemoryFeatures().gradient_checkpointing
    plain = MemoryFeatures.plain()
    assert plain.tiled_loss_chunk is None and plain.tiled_mlp_chunks is None and not plain.checkpoint_offload
    for bad in (dict(tiled_loss_chunk=0), dict(tiled_loss_chunk=2.5), dict(tiled_mlp_chunks=0),
                dict(tiled_mlp_chunks="many"), dict(tiled_mlp_chunks=True),
                dict(checkpoint_offload=True, gradient_checkpointing=False)):
        with pytest.raises(ValueError):
            MemoryFeatures(**bad)
    assert resolve_mlp_chunks(MemoryFeatures(tiled_mlp_chunks=None), 10**6, 64) is None
    assert resolve_mlp_chunks(MemoryFeatures(tiled_mlp_chunks=5), 10**6, 64) == 5
    assert MemoryFeatures().to_json()["tiled_mlp_chunks"] == AUTO


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**7), st.integers(1, 16384))
def test_mlp_chunks_cover_shard_with_at_most_hidden_tokens(shard, hidden):
    n = mlp_chunks_for(shard, hidden)
    assert n >= 1 and n * hidden >= shard and (n == 1 or (n - 1) * hidden < shard)
