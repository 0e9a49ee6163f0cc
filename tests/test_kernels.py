"""Single-process checks of the local kernels, the block decomposition and the LSE merge."""
import dataclasses
import math

import pytest
import torch

from runtime.attention.blockattn import SeqMeta, block_backward, block_forward, merge
from runtime.attention.kernels import KERNELS, KernelError, select_kernel
from runtime.layout import ShardPlan
from spbench.check.attention import AttnCase, make_inputs, oracle

CPU_KERNELS = [KERNELS["reference"], KERNELS["cpu-flash"]]


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", [(), (5, 1, 17, 8)])
def test_kernel_matches_oracle_in_float64(kernel, causal, docs):
    case = AttnCase("ring", 1, heads=6, kv_heads=2, seq=31, head_dim=8, causal=causal, docs=docs, batch=2)
    x, ref = make_inputs(case), None
    ref = oracle(case, x)
    docs_t = case.doc_ids()
    mask = None if docs_t is None else docs_t[:, :, None] == docs_t[:, None, :]
    out, lse = kernel.forward(x["q"], x["k"], x["v"], causal=causal, mask=mask, scale=1 / math.sqrt(8))
    dq, dk, dv = kernel.backward(x["dout"], x["q"], x["k"], x["v"], out, lse, causal=causal, mask=mask, scale=1 / math.sqrt(8))
    for name, got in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv).items():
        assert torch.allclose(got, ref[name], atol=1e-12, rtol=0), name


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=lambda k: k.name)
def test_row_with_nothing_to_attend_gives_zero_and_minus_inf(kernel):
    q = k = v = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    mask[0, 1] = False
    out, lse = kernel.forward(q, k, v, causal=False, mask=mask, scale=0.5)
    assert torch.all(out[0, :, 1] == 0) and torch.all(torch.isneginf(lse[0, :, 1]))
    assert torch.isfinite(lse[0, :, [0, 2]]).all()


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=lambda k: k.name)
def test_block_backward_with_global_lse_is_exact(kernel):
    """Split the keys in two blocks, merge, then back-propagate each block with the merged out/lse."""
    case = AttnCase("ring", 1, heads=4, kv_heads=4, seq=24, head_dim=8, causal=True)
    x, ref = make_inputs(case), None
    ref = oracle(case, x)
    plan = ShardPlan(24, 1, 1, False)
    meta = SeqMeta.build(plan, 24, causal=True)
    q_segs = ((0, 10), (10, 24))  # queries cut like the keys: pairs are full, diagonal or skipped
    a, b = ((0, 10),), ((10, 24),)
    ka, kb = x["k"][:, :, :10], x["k"][:, :, 10:]
    va, vb = x["v"][:, :, :10], x["v"][:, :, 10:]
    oa, la = block_forward(x["q"], ka, va, q_segs, a, meta, kernel, 1 / math.sqrt(8))
    ob, lb = block_forward(x["q"], kb, vb, q_segs, b, meta, kernel, 1 / math.sqrt(8))
    out, lse = merge(oa, la, ob, lb)
    assert torch.allclose(out, ref["out"], atol=1e-12) and torch.allclose(lse, ref["lse"], atol=1e-12)
    ga = block_backward(x["dout"], x["q"], ka, va, out, lse, q_segs, a, meta, kernel, 1 / math.sqrt(8))
    gb = block_backward(x["dout"], x["q"], kb, vb, out, lse, q_segs, b, meta, kernel, 1 / math.sqrt(8))
    assert torch.allclose(ga[0] + gb[0], ref["dq"], atol=1e-12)
    assert torch.allclose(torch.cat([ga[1], gb[1]], 2), ref["dk"], atol=1e-12)
    assert torch.allclose(torch.cat([ga[2], gb[2]], 2), ref["dv"], atol=1e-12)


def test_merge_is_stable_with_huge_logits():
    """F9: partial lse of 1e4 (exp overflows float64 at ~709) must merge without inf/NaN."""
    lse_a = torch.tensor([1e4, float("-inf"), 3.0], dtype=torch.float64)
    lse_b = torch.tensor([1e4 + math.log(3), 5.0, float("-inf")], dtype=torch.float64)
    oa = torch.tensor([[1.0], [7.0], [2.0]], dtype=torch.float64)
    ob = torch.tensor([[5.0], [4.0], [9.0]], dtype=torch.float64)
    out, lse = merge(oa, lse_a, ob, lse_b)
    assert torch.allclose(lse[0], torch.tensor(1e4 + math.log(4), dtype=torch.float64))
    assert torch.allclose(out[:, 0], torch.tensor([0.25 * 1 + 0.75 * 5, 4.0, 2.0], dtype=torch.float64))
    both_empty = merge(oa[:1] * 0, lse_a[1:2], ob[:1] * 0, lse_b[2:3])
    assert torch.isneginf(both_empty[1]).all() and (both_empty[0] == 0).all()


def test_select_kernel_auto_and_errors():
    assert select_kernel("auto", torch.device("cpu"), torch.float64).name == "cpu-flash"
    with pytest.raises(KernelError, match="unknown attention kernel 'nope'"):
        select_kernel("nope", torch.device("cpu"), torch.float64)
    with pytest.raises(KernelError, match="needs CUDA"):
        select_kernel("cuda-cudnn", torch.device("cpu"), torch.bfloat16)


MASKLESS = dataclasses.replace(KERNELS["cpu-flash"], supports_mask=False)  # takes the CUDA kernels' path


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("doc_rows", [
    [[7, 1, 20, 12]],  # one id row for the whole batch
    [[7, 1, 20, 12], [40], [3, 3, 30, 4]],  # a different packing per row; row 2 is one document
])
def test_maskless_kernel_splits_pairs_by_document_exactly(causal, doc_rows):
    """Kernels without masks (CUDA) run packed pairs as one call per document; same result as the mask."""
    seq, heads, scale = 40, 4, 1 / math.sqrt(8)
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in doc_rows])
    plan = ShardPlan.for_length(seq, 2, 1, zigzag=True)
    meta = SeqMeta.build(plan, seq, causal=causal, doc_ids=doc_ids)
    q_segs = plan.segments(0)
    k_segs = tuple(s for r in range(2) for s in plan.segments(r))
    g = torch.Generator().manual_seed(3)
    b = 3
    q = torch.randn(b, heads, plan.local_len, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(b, 2, plan.total_len, 8, dtype=torch.float64, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    results = {}
    for kernel in (KERNELS["reference"], MASKLESS):
        out, lse = block_forward(q, k, v, q_segs, k_segs, meta, kernel, scale)
        results[kernel.supports_mask] = (out, lse, *block_backward(dout, q, k, v, out, lse, q_segs, k_segs, meta, kernel, scale))
    for name, want, got in zip(("out", "lse", "dq", "dk", "dv"), results[True], results[False]):
        assert torch.allclose(got, want, atol=1e-12, rtol=0), name
    assert torch.isfinite(results[True][1]).any()
