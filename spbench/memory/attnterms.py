"""The memory model's attention terms: what SP attention holds per GPU, strategy by strategy (memory/terms.py
adds them into a layer's backward; the notation is terms.py's: h hidden, H/Hk heads/kv heads, d head dim).

Checked against traces of the trainer's step at 1M tokens, SP 8, ZeRO-3 + checkpoint offload, the trace's own CPU
kernel (reports/cost/strategies: `spbench cost --attention-kernel cpu-flash`, 2026-12-02, the peak over SP ranks 0
and 7; model / trace − 1 of the whole peak): Qwen2.5-7B zigzag −0.12 %, hybrid u4×r2 −0.13 %, ring −0.13 % (rank
7), allgather −0.09 % (rank 7); Llama-3.1-8B ulysses −0.26 %. The CUDA kernel's own bytes
(`cuda_kernel_bytes`) are derived from the code, not traced or measured.
"""
from __future__ import annotations

from .setup import Setup, Shape

ACT = 2  # bytes per activation element (bf16)


def kv_heads_local(s: Setup, m: Shape) -> int:
    """kv heads a GPU's attention sees, summed over the full sequence: Ulysses (alone or in the hybrid)
    replicates kv heads up to its degree (DESIGN.md), ring, zigzag and allgather keep them."""
    return max(m.kv_heads, s.ulysses) if s.ulysses > 1 else m.kv_heads


def blockwise(s: Setup) -> bool:
    """Keys visited block by block into an fp32 accumulator (ring, zigzag, the hybrid's ring, allgather)."""
    return s.sp > 1 and (s.sp_method == "allgather" or s.sp // s.ulysses > 1)


def kernel_calls_per_block(s: Setup) -> int:
    """Kernel calls per (query block, key block) pair: 2 where the zigzag layout gives a block two halves (zigzag,
    the hybrid's ring, allgather's queries; the pair's visible halves), else 1 (runtime/attention/blockattn.py)."""
    return 2 if blockwise(s) and s.sp_method != "ring" else 1


def attention_backward_bytes(s: Setup, m: Shape, n: int) -> float:
    """Live bytes of the attention backward beside the block's saved tensors, less o_proj's saved input (2h; its
    backward has run): the larger of two moments (traced, memory/trace.py, CPU kernel, 7B SP 8 at 1M tokens).
    At a kernel call: residual and output gradients (2h + 2h), a whole call's dq (2·H·d) and dk/dv (2·2·Hk'·d),
    the ring's K/V blocks and accumulators (or allgather's gathered K/V); blockwise, the fp32 dq accumulator
    (4·H·d); for blocks of two halves, the halves' contiguous copies of dout, q, out and lse less a half call's
    smaller dq ((2·H·d + 2·H); tests/test_traced.py holds it exact; allgather: 4·H·d, its last rank's whole call);
    a pure ring's contiguous copy of dout (2·H·d;
    after an all-to-all it is contiguous already); and on CUDA `cuda_kernel_bytes`. At Ulysses' all-to-all of
    dq/dk/dv back to the sequence layout: the residual gradient, dq/dk/dv and the all-to-all's send and receive
    copies (the kernel's temporaries are gone by then)."""
    hd, calls = m.heads * m.head_dim, kernel_calls_per_block(s)
    kv = ACT * kv_heads_local(s, m) * m.head_dim
    o_proj_input = 2 * m.hidden  # saved by o_proj, whose backward has run: not alive here
    grads = 4 * m.hidden + ACT * hd + 2 * kv
    accumulator = 4 * hd if blockwise(s) else 0.0
    # allgather's last rank holds the two middle chunks: one call over both, its dq whole and whole copies of the
    # transposed dout and RoPE's q (traced, 7B SP 8 at 1M: 2·H·d per token above rank 0's halves)
    halves = 4 * hd if s.sp_method == "allgather" else 2 * hd + 2 * m.heads if calls == 2 else 0.0
    # a pure ring's incoming gradient is the transposed view of o_proj's input gradient: RingAttention copies it
    copy = ACT * hd if s.sp_method in ("ring", "zigzag") and s.sp > 1 else 0.0
    kernel = (grads + accumulator + halves + copy) * n + ring_buffer_bytes(s, m, n) + cuda_kernel_bytes(s, m, n)
    exchange = (2 * m.hidden + ACT * hd + 2 * kv) * n + ulysses_buffer_bytes(s, m, n) if s.ulysses > 1 else 0.0
    return max(kernel, exchange) - o_proj_input * n


def cuda_kernel_bytes(s: Setup, m: Shape, n: int) -> float:
    """What a CUDA kernel call adds (none for cpu-flash, the trace's): its fp32 dq accumulator (4·H·d per query) and,
    for cuda-cudnn / cuda-flash with GQA, K and V expanded to every head with their gradients before the fold
    (4·2·H·d per key: runtime/attention/kernels.py _expand_kv; flash-attn takes GQA as it is); per call, a half
    block where blocks have two halves (allgather's last rank: its queries in one call). Derived from the code and flash-attention's backward, not traced or
    measured."""
    if s.attention_kernel == "cpu-flash":
        return 0.0
    hd = m.heads * m.head_dim
    expands = s.attention_kernel in ("cuda-cudnn", "cuda-flash") and kv_heads_local(s, m) < m.heads
    expand = 4 * ACT * hd if expands else 0.0
    calls = kernel_calls_per_block(s)
    queries = n if s.sp_method == "allgather" else n / calls  # allgather's last rank: one call over its two chunks
    return 4 * hd * queries + expand * n / calls


def sp_buffer_bytes(s: Setup, m: Shape, n: int) -> float:
    """SP communication buffers during attention, per strategy (Hk' = kv_heads_local, u / r = Ulysses / ring
    degree): `ulysses_buffer_bytes` + `ring_buffer_bytes` (a report term; attention_backward_bytes holds each at
    the moment it is alive). None without SP."""
    return ulysses_buffer_bytes(s, m, n) + ring_buffer_bytes(s, m, n)


def ulysses_buffer_bytes(s: Setup, m: Shape, n: int) -> float:
    """Ulysses part (u > 1): an all-to-all's send + receive copies of q, k, v (or their gradients): 2 × (2h +
    2·2·Hk'·d) per token."""
    if s.sp == 1 or s.ulysses == 1 or s.sp_method == "allgather":
        return 0.0
    return 2 * (2 * m.hidden + 2 * ACT * kv_heads_local(s, m) * m.head_dim) * n


def ring_buffer_bytes(s: Setup, m: Shape, n: int) -> float:
    """Ring part (ring, zigzag, hybrid with r > 1): the K/V blocks beside the rank's own (saved for backward) —
    the received current one and the next in flight, both only on a middle step: a ring of 2 has none, its one
    exchange step holds one (min(2, r − 1) × 2·2·Hk'·d) — and fp32 dK/dV accumulators (2·4·Hk'·d) per token;
    after the hybrid's all-to-all a rank holds u× the tokens with 1/u of the heads, the same bytes (traced:
    Qwen2.5-1.5B and 7B hybrid u4×r2, the ring of 2 counted as 2 blocks: model +1.3 h per token over). Allgather, per token of the whole sequence (n·sp tokens): every rank's K
    and V gathered (2·2·Hk·d) and their fp32 gradients (2·4·Hk·d), alive at the kernel calls (traced, 7B SP 8; the
    casts to bf16 for the reduce-scatter come one at a time, each fp32 freed: blockattn.LocalAttention)."""
    if s.sp == 1:
        return 0.0
    kv = kv_heads_local(s, m) * m.head_dim
    if s.sp_method == "allgather":
        return (2 * ACT + 2 * 4) * kv * n * s.sp
    ring = s.sp // s.ulysses
    return (min(2, ring - 1) * 2 * ACT * kv + 2 * 4 * kv) * n if ring > 1 else 0.0
