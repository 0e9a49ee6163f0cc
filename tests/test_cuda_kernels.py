"""The CUDA-only kernels, checked without a GPU.

* cuda-flash / cuda-cudnn: run on fake CUDA tensors (FakeTensorMode), which checks every
  argument against the aten op's schema and the shapes/dtypes we read back. Numerics of
  these ops need a GPU (`spbench gpu-check`).
* flash-attn: a stand-in module with flash-attn 2.7's low-level signatures (layout
  [b, s, H, d], native GQA, backward writing into dq/dk/dv with the lse it is given),
  computed by the float64 reference, checks our layout and lse plumbing exactly.
"""
import math
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from runtime.attention import kernels
from runtime.attention.blockattn import SeqMeta, block_backward, block_forward
from runtime.attention.kernels import KERNELS, KernelError, select_kernel
from runtime.layout import ShardPlan


@pytest.mark.parametrize("name", ["cuda-flash", "cuda-cudnn"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_match_the_aten_schemas(name, causal):
    kernel = KERNELS[name]
    with FakeTensorMode():
        q = torch.empty(2, 8, 48, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 2, 48, 64, dtype=torch.bfloat16, device="cuda")
        out, lse = kernel.forward(q, k, k, causal=causal, scale=0.125)
        dq, dk, dv = kernel.backward(out, q, k, k, out, lse, causal=causal, scale=0.125)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 8, 48) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


def _reference_bshd(fn, *xs, **kw):
    """Call a [b, H, s, d] reference function on flash-attn's [b, s, H, d] tensors."""
    return fn(*(x.transpose(1, 2) if x.dim() == 4 else x for x in xs), **kw)


def _flash_attn_stand_in() -> types.ModuleType:
    iface = types.ModuleType("flash_attn.flash_attn_interface")

    def forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                alibi_slopes, return_softmax):
        assert (dropout_p, window_size_left, window_size_right, softcap, alibi_slopes) == (0.0, -1, -1, 0.0, None)
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        out, lse = _reference_bshd(kernels.reference_forward, q, k, v, causal=causal, scale=softmax_scale)
        return out.transpose(1, 2).contiguous(), lse, torch.empty(0), torch.empty(2, dtype=torch.int64)

    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
        assert softmax_lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and softmax_lse.is_contiguous()
        grads = _reference_bshd(kernels.reference_backward, dout, q, k, v, out, softmax_lse, causal=causal,
                                scale=softmax_scale)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g.transpose(1, 2))
        return torch.empty(0)

    iface._wrapped_flash_attn_forward, iface._wrapped_flash_attn_backward = forward, backward
    return iface


@pytest.fixture
def flash_attn(monkeypatch):
    iface = _flash_attn_stand_in()
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_kernel_equals_reference(flash_attn, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 19, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, 19, 8, dtype=torch.float64, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    fa, ref = KERNELS["flash-attn"], KERNELS["reference"]
    got_out, got_lse = fa.forward(q, k, v, causal=causal, scale=0.3)
    want_out, want_lse = ref.forward(q, k, v, causal=causal, scale=0.3)
    got = (got_out, got_lse, *fa.backward(dout, q, k, v, want_out, want_lse, causal=causal, scale=0.3))
    want = (want_out, want_lse, *ref.backward(dout, q, k, v, want_out, want_lse, causal=causal, scale=0.3))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12, rtol=0), name


def test_flash_attn_runs_packed_ring_blocks_exactly(flash_attn):
    """Through blockattn: zigzag pairs with packed documents, split by document for the mask-free kernel."""
    plan = ShardPlan.for_length(32, 2, 1, zigzag=True)
    meta = SeqMeta.build(plan, 32, causal=True, doc_ids=torch.tensor([[0] * 5 + [1] * 19 + [2] * 8]))
    q_segs, k_segs = plan.segments(1), tuple(s for r in range(2) for s in plan.segments(r))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, plan.local_len, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, 4, plan.total_len, 8, dtype=torch.float64, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    res = {}
    for name in ("flash-attn", "reference"):
        out, lse = block_forward(q, k, v, q_segs, k_segs, meta, KERNELS[name], 1 / math.sqrt(8))
        res[name] = (out, lse, *block_backward(dout, q, k, v, out, lse, q_segs, k_segs, meta, KERNELS[name], 1 / math.sqrt(8)))
    for a, b in zip(res["flash-attn"], res["reference"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_flash_attn_head_dim_limits_are_one_clear_error(flash_attn):
    q = torch.zeros(1, 2, 4, 12, dtype=torch.float64)
    with pytest.raises(KernelError, match="multiple of 8"):
        KERNELS["flash-attn"].forward(q, q, q, causal=True, scale=1.0)


def test_flash_attn_missing_or_old_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as when not installed
    with pytest.raises(KernelError, match="pip install"):
        select_kernel("flash-attn", torch.device("cuda"), torch.bfloat16)
    old = types.ModuleType("flash_attn")
    old.flash_attn_interface = types.ModuleType("flash_attn.flash_attn_interface")
    monkeypatch.setitem(sys.modules, "flash_attn", old)
    with pytest.raises(KernelError, match=">= 2.7"):
        select_kernel("flash-attn", torch.device("cuda"), torch.bfloat16)


def test_flash_attn_needs_cuda_and_16_bit(flash_attn):
    with pytest.raises(KernelError, match="CUDA"):
        select_kernel("flash-attn", torch.device("cpu"), torch.bfloat16)
    assert select_kernel("flash-attn", torch.device("cuda"), torch.bfloat16).name == "flash-attn"
