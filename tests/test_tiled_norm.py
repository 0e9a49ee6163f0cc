"""The tiled RMSNorm (runtime/tiled_norm.py) is transformers' RMSNorm: forward bitwise, backward to rounding, in a
whole model under checkpointing and LoRA; and it lowers a traced step's activation peak."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from runtime.losses import IGNORE, sft_loss, token_logprobs
from runtime.memory import MemoryFeatures, forward_context, prepare_model
from runtime.models import build_model
from runtime.tiled_norm import TiledRMSNorm, apply_tiled_norm, remove_tiled_norm

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [((2, 37, 24), 8), ((1, 50, 16), 7), ((3, 5, 8), 4), ((4, 24), 5), ((2, 9, 16), 64)]  # (x shape, chunk)


def _hf_norm(cls, hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    norm = cls(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) + 1)
    return norm


def _fwd_bwd(norm, x, dy):
    x = x.detach().clone().requires_grad_()
    norm.zero_grad(set_to_none=True)
    out = norm(x)
    out.backward(dy)
    return out.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("cls", [Qwen2RMSNorm, LlamaRMSNorm])
@pytest.mark.parametrize("shape,chunk", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_equals_hf_module_forward_and_backward(cls, shape, chunk, dtype):
    """Several chunks with a ragged last one, batch > 1 (chunks run over the rows of all sequences), and one chunk
    larger than the input. Measured: out and dx bitwise equal in every dtype (the backward is autograd's formulas
    in its order); dweight bitwise here too (its sum runs per chunk, so only ≤ 1e-12 is promised in float64)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    hf = _hf_norm(cls, shape[-1], dtype)
    tiled = TiledRMSNorm(copy.deepcopy(hf), chunk)
    out_r, dx_r, dw_r = _fwd_bwd(hf, x, dy)
    out_t, dx_t, dw_t = _fwd_bwd(tiled, x, dy)
    assert out_t.dtype == out_r.dtype and torch.equal(out_t, out_r)
    assert torch.equal(dx_t, dx_r)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(dw_t, dw_r, rtol=tol, atol=tol)
    assert dw_r.abs().sum() > 0 and dx_r.abs().sum() > 0
    with torch.no_grad():  # the no-grad path (DPO reference, evaluation): the chunked forward only
        assert torch.equal(tiled(x), out_r)


def test_frozen_weight_and_frozen_input():
    """LoRA leaves norms frozen: no weight gradient, dx as HF's; an input without grad: the weight's only."""
    hf = _hf_norm(Qwen2RMSNorm, 16, torch.float64).requires_grad_(False)
    tiled = TiledRMSNorm(copy.deepcopy(hf), 3)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    dy = torch.randn_like(x)
    out_r, dx_r, _ = _fwd_bwd(hf, x, dy)
    out_t, dx_t, dw_t = _fwd_bwd(tiled, x, dy)
    assert dw_t is None and torch.equal(dx_t, dx_r) and torch.equal(out_t, out_r)
    hf.requires_grad_(True)
    tiled = TiledRMSNorm(copy.deepcopy(hf), 3)
    (hf(x) * dy).sum().backward()
    (tiled(x) * dy).sum().backward()
    torch.testing.assert_close(tiled.weight.grad, hf.weight.grad, rtol=1e-12, atol=1e-12)


def test_apply_and_remove_keep_parameters_and_keys():
    model = build_model("tiny", torch.float64, "sdpa", seed=0)
    keys = list(model.state_dict())
    weights = {n: p for n, p in model.named_parameters() if "norm" in n}
    layers = model.config.num_hidden_layers
    assert apply_tiled_norm(model, 8) == 2 * layers + 1  # input / post-attention norms of each layer, model.norm
    assert apply_tiled_norm(model, 5) == 2 * layers + 1  # re-applying updates the chunk, never double-wraps
    assert model.model.norm.chunk_tokens == 5 and isinstance(model.model.layers[0].input_layernorm, TiledRMSNorm)
    assert list(model.state_dict()) == keys
    assert {n: p for n, p in model.named_parameters() if "norm" in n}.items() == weights.items()  # same objects
    assert remove_tiled_norm(model) == 2 * layers + 1
    assert type(model.model.norm).__name__ == "Qwen2RMSNorm" and model.model.norm.weight is weights["model.norm.weight"]
    assert remove_tiled_norm(model) == 0
    with pytest.raises(ValueError, match="chunk_tokens"):
        apply_tiled_norm(model, 0)


@pytest.mark.parametrize("norm", [GemmaRMSNorm(8), Olmo2RMSNorm(8), torch.nn.LayerNorm(8)])
def test_other_norms_are_refused(norm):
    """Gemma scales by 1 + weight, Olmo2 multiplies before the cast: RMSNorm by name, not HF's Llama arithmetic."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), norm)
    with pytest.raises(ValueError, match="tiled_norm_chunk: null"):
        apply_tiled_norm(model, 4)


def _step(model, ids, targets, features: MemoryFeatures):
    model.zero_grad(set_to_none=True)
    prepare_model(model, features, ids.numel(), model.config.hidden_size)
    with forward_context(features):
        hidden = model.model(input_ids=ids).last_hidden_state  # [b, s, h]
    logp = token_logprobs(hidden, model.lm_head, targets, chunk_tokens=features.tiled_loss_chunk)
    loss = sft_loss(logp, targets, int((targets != IGNORE).sum()))
    loss.backward()
    return loss.detach(), {n.replace(".mlp.mlp.", ".mlp."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("ckpt,offload", [(False, False), (True, False), (True, True)])
def test_model_step_equals_untiled(ckpt, offload):
    """tiny Qwen2 in float64, 2 × 29 tokens, 7-token norm chunks, with the tiled MLP and loss: loss and every
    gradient as with transformers' RMSNorm, under checkpointing (non-reentrant) and checkpoint offload."""
    model = build_model("tiny", torch.float64, "sdpa", seed=0).train()
    g = torch.Generator().manual_seed(3)
    ids, targets = torch.randint(0, 512, (2, 29), generator=g), torch.randint(0, 512, (2, 29), generator=g)
    base = MemoryFeatures(tiled_loss_chunk=16, tiled_mlp_chunks=3, gradient_checkpointing=ckpt,
                          checkpoint_offload=offload)
    loss_r, grads_r = _step(model, ids, targets, replace(base, tiled_norm_chunk=None))
    loss_t, grads_t = _step(model, ids, targets, replace(base, tiled_norm_chunk=7))
    assert isinstance(model.model.norm, TiledRMSNorm)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-12, atol=1e-12)
    assert grads_t.keys() == grads_r.keys() and any("layernorm" in n for n in grads_r)
    for name, grad in grads_r.items():
        torch.testing.assert_close(grads_t[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_memory_features_switch():
    assert MemoryFeatures().tiled_norm_chunk == 4096 and MemoryFeatures.plain().tiled_norm_chunk is None
    assert MemoryFeatures(tiled_norm_chunk=9).to_json()["tiled_norm_chunk"] == 9
    for bad in (0, 2.5, True, "auto"):
        with pytest.raises(ValueError, match="tiled_norm_chunk"):
            MemoryFeatures(tiled_norm_chunk=bad)


def test_traced_peak_drops_by_the_norm_backward_temporaries():
    """Fake-tensor trace of the trainer's step (spbench/memory/trace.py): qwen2.5-0.5b (hidden 896), SFT, bf16,
    16,384 tokens, 64-token loss chunks (so the loss is not the peak), tiled MLP, checkpointing; norm off vs on.

    Measured (torch 2.13.0+cpu): state-free peak 2.2393 GiB off, in the last layer's post_attention_layernorm
    backward (mul.Tensor); 1.9599 GiB on, in that layer's MLP backward: −0.2794 GiB. Floor asserted: the five
    fp32 [tokens × hidden] temporaries, 5 × 4 B × 896 × 16384 = 0.2734 GiB, less the three fp32 [4096 × 896] of
    one chunk's backward, 0.0410 GiB: ≥ 0.2324 GiB. ~55 s on 2 cores."""
    from spbench.common.units import GiB
    from spbench.memory import trace as memtrace
    from spbench.memory.step import StepSpec

    if memtrace.available() is not None:
        pytest.skip(f"FakeTensorMode/MemTracker unavailable: {memtrace.available()}")
    tokens, hidden, chunk = 16384, 896, 4096
    peaks = {}
    for norm in (None, chunk):
        features = MemoryFeatures(tiled_loss_chunk=64, tiled_norm_chunk=norm)
        out = memtrace.traced_peak(StepSpec("qwen2.5-0.5b", "sft", tokens, features, dtype="bfloat16", device="cpu"))
        peaks[norm] = out
    assert "post_attention_layernorm" in peaks[None]["state_free_where"]
    floor = (5 * 4 * hidden * tokens - 3 * 4 * hidden * chunk) / GiB
    assert peaks[None]["state_free_peak_gib"] - peaks[chunk]["state_free_peak_gib"] >= floor
