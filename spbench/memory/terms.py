"""The memory model's terms: bytes per GPU of each part of a training step (memory/model.py adds them up).

Byte counts per token are written out per term (h hidden, L layers, H/Hk heads/kv heads, d head dim,
I intermediate, V vocab; activations bf16). Every constant says where it comes from.
"""
from __future__ import annotations

import math

from runtime.memory import AUTO

from ..common.units import GiB
from .attnterms import ACT, attention_backward_bytes, kv_heads_local
from .setup import Setup, Shape

LOGITS_COPIES = 3.0
"""fp32 [tokens × vocab] copies live at the loss's peak (log-softmax backward: its saved output, the
incoming gradient and the outgoing gradient; the bf16 logits and the fp32 upcast are freed by then).
Measured slopes (H200, plain): 7B 2.06 MB/token, 0.5B 1.87 MB/token; minus the checkpoints that is
3.0 ± 0.05 copies of 4 B × vocab. The tiled loss has the same copies for one chunk."""

REF_LOGITS_COPIES = 2.5
"""No-grad reference forward: bf16 logits (0.5) + fp32 upcast (1) + log-softmax output (1). Derived, not
measured: no measured point has its peak in the reference phase."""

FOREACH_TEMP_COPIES = 1.0
"""torch AdamW (foreach, the CUDA default) makes one parameter-sized temporary (sqrt of exp_avg_sq) for all
tensors at once. Calibrated: 7B SFT at 8k peaks in the step: 2+2+4+2 B/param = 70.93 GiB, measured 71.2."""

WORKSPACE_GIB = 0.25
"""cuBLAS/cuDNN workspaces, RoPE tables, small buffers: the 7B SFT 8k residual (71.2 − 70.93 GiB)."""

REDUCE_BUCKET_ELEMS = 500_000_000
"""DeepSpeed's default reduce_bucket_size (elements, bf16) for ZeRO-2/3 gradient reduction."""

ZERO3_LIVE_MODULES = 2
"""ZeRO-3 gathers the module being computed plus one prefetched (largest: a layer or the embedding)."""

LM_HEAD_GRAD_COPIES = 3
"""Tiled loss: lm_head weight-gradient-sized bf16 tensors alive while autograd adds a chunk's into the sum (the sum,
the chunk's, the result). Traced (qwen2.5-7b, SP 8, 262k tokens, tiled RMSNorm on): the step's activation peak."""

RMSNORM_BACKWARD_TEMPS = 5
"""fp32 [tokens × hidden] temporaries alive at once in the backward of transformers' RMSNorm (autograd of its
Python forward: pow's and mean's gradients, the two multiplies', the fp32 cast's). Traced (spbench/memory/trace.py,
qwen2.5-7b, hybrid SP 8, 2026-12-01): the step's activation peak is the last layer's post-attention RMSNorm
backward, with exactly these five [n × h] fp32 tensors beside its saved fp32 input."""

CKPT_OFFLOAD_RESIDENT_LAYERS = 0
"""With checkpoint offload, checkpointed hidden states on the GPU at the layers' peak: none. A layer's input is
brought back (on demand, on the compute stream) for its recompute and freed once the recompute has saved its
own tensors; the traced peak (a post-attention RMSNorm backward, spbench/memory/trace.py) holds none."""

# LoRA's own activations are neglected: per adapted linear and token, lora_B saves its r-wide input A·x (2r B; x is
# the base layer's saved input already), so r = 8 on all 7 linears adds 7 × 2 × 8 = 112 B per token and layer,
# inside a checkpointed layer's recompute only: < 0.3% of a 7B layer's backward peak (≈ 49 kB/token, h = 3584).
# Frozen base weights have no gradients and no optimizer states; the adapters' are sized like full training's
# (Setup.trained_params), in the same dtypes.


def _trained(s: Setup, m: Shape) -> int:
    """Parameters with gradients and AdamW states (all, or the LoRA adapters)."""
    return s.trained_params(m)


def _weights(s: Setup, m: Shape) -> int:
    """Parameters held as weights: the model's, plus the adapters with LoRA."""
    return m.params + (0 if s.finetuning == "full" else _trained(s, m))


# ----------------------------------------------------------------------------------- static terms (bytes)
def param_bytes(s: Setup, m: Shape) -> float:
    """bf16 weights of the policy resident on this GPU: full (zero 0/2), 1/gpus (zero 3), 0 (param offload)."""
    if "param" in s.offload:
        return 0.0
    return 2.0 * _weights(s, m) / (s.gpus if s.zero == 3 else 1)


def reference_param_bytes(s: Setup, m: Shape) -> float:
    """DPO: the frozen reference model's bf16 weights, placed like the policy's (no optimizer, no grads); none
    with LoRA, whose reference is the policy with adapters disabled."""
    return param_bytes(s, m) if s.stage == "dpo" and s.finetuning == "full" else 0.0


def gathered_param_bytes(s: Setup, m: Shape) -> float:
    """ZeRO-3: full bf16 weights of the modules being computed (current + prefetched)."""
    if s.zero != 3:
        return 0.0
    return ZERO3_LIVE_MODULES * 2.0 * max(m.layer_params, m.embed_params)


def optimizer_bytes(s: Setup, m: Shape) -> float:
    """AdamW states on this GPU: bf16 m, v (zero 0: 4 B/param); fp32 master + m + v (12 B/param / gpus)."""
    if s.zero == 0:
        return 4.0 * _trained(s, m)
    return 0.0 if "optimizer" in s.offload else 12.0 * _trained(s, m) / s.gpus


def grad_bytes(s: Setup, m: Shape) -> float:
    """Gradients held on this GPU once backward has produced them: full bf16 (zero 0), else this rank's
    bf16 partition (on CPU with optimizer offload) plus one reduce bucket."""
    if s.zero == 0:
        return 2.0 * _trained(s, m)
    part = 0.0 if "optimizer" in s.offload else 2.0 * _trained(s, m) / s.gpus
    return part + 2.0 * min(REDUCE_BUCKET_ELEMS, _trained(s, m))


def tied_head_grad_bytes(s: Setup, m: Shape) -> float:
    """Tied embeddings under ZeRO: the lm_head use's bf16 gradient (vocab × h) waits in autograd's input buffer from
    the loss's backward to the embedding's, the end of backward, where both uses' gradients are summed before
    DeepSpeed's hook takes them (traced: Qwen2.5-1.5B / 3B, the layers' backward). ZeRO 0 counts the full
    gradients there already; LoRA trains no embedding."""
    return 2.0 * m.vocab * m.hidden if m.tied and s.zero and s.finetuning == "full" else 0.0


def step_temp_bytes(s: Setup, m: Shape) -> float:
    """Optimizer-step temporaries: torch foreach AdamW's parameter-sized buffer (zero 0), the fp32 copy of the
    gradient partition (ZeRO on GPU), nothing on the GPU for CPU Adam (optimizer offload)."""
    if s.zero == 0:
        return FOREACH_TEMP_COPIES * 2.0 * _trained(s, m)
    return 0.0 if "optimizer" in s.offload else 4.0 * _trained(s, m) / s.gpus


def workspace_bytes() -> float:
    """Fixed workspace (see WORKSPACE_GIB)."""
    return WORKSPACE_GIB * GiB


def host_bytes(s: Setup, m: Shape, n: int) -> float:
    """CPU memory this GPU's rank needs: offloaded optimizer (fp32 master, m, v, fp32 grads: 16 B/param/gpus),
    offloaded weights (policy and reference), offloaded checkpoints (layers × n × h × 2 B, and the final RMSNorm's
    saved tensors: everything saved in the decoder's forward is offloaded)."""
    b = 16.0 * _trained(s, m) / s.gpus if "optimizer" in s.offload else 0.0
    if "param" in s.offload:
        b += 2.0 * _weights(s, m) / s.gpus * (s.rows if s.finetuning == "full" else 1)
    if s.features.checkpoint_offload and s.features.gradient_checkpointing:
        b += (m.layers * m.hidden * ACT + norm_saved_per_token(s, m)) * n
    return b


# ------------------------------------------------------------------------------ activation terms (bytes)
def norm_saved_per_token(s: Setup, m: Shape, input_held: bool = False) -> float:
    """What one RMSNorm saves for backward, per token. transformers' RMSNorm: its fp32 input (4h), the bf16 cast the
    weight multiplies (2h), the bf16 output the next linear saves (2h) (traced). The tiled RMSNorm
    (runtime/tiled_norm.py): its input as it is (2h; none when `input_held`: a layer's checkpointed input, held
    anyway), fp32 rstd (4 B) and the output (2h)."""
    if s.features.tiled_norm_chunk is None:
        return 8 * m.hidden
    return (0 if input_held else 2 * m.hidden) + 4 + 2 * m.hidden


def attention_saved_per_token(s: Setup, m: Shape) -> float:
    """What one layer's attention block saves for backward, per token: input RMSNorm (8h), q after RoPE (2h),
    k and v (2·2·Hk·d), attention output (2h) and its transposed copy fed to o_proj (2h), fp32 log-sum-exp
    (4H), RoPE's bf16 cos and sin (2·2d)."""
    h = m.hidden
    kv = 2 * ACT * kv_heads_local(s, m) * m.head_dim
    # the input norm's input is the layer's checkpoint (unless offloaded: then its unpacked copy stays for the norm)
    held = s.features.gradient_checkpointing and not s.features.checkpoint_offload
    norm = norm_saved_per_token(s, m, input_held=held)
    return norm + 2 * h + kv + 2 * h + 2 * h + 4 * m.heads + 2 * ACT * m.head_dim


def mlp_saved_per_token(m: Shape) -> float:
    """What an untiled MLP saves per token: gate, up, act(gate), act·up, all bf16 [tokens × I] (8I)."""
    return 4 * ACT * m.intermediate


def mlp_tokens(s: Setup, m: Shape, n: int) -> int:
    """Tokens whose [× I] MLP activations exist at once: n untiled; one chunk tiled. For "auto" the model
    charges min(n, hidden), an upper bound of the real ceil(n / ceil(n / hidden)) that keeps the model
    monotone in length."""
    chunks = s.features.tiled_mlp_chunks
    if chunks is None:
        return n
    if chunks == AUTO:
        return min(n, m.hidden)
    return math.ceil(n / int(chunks))


def layer_saved_bytes(s: Setup, m: Shape, n: int) -> float:
    """Everything one layer keeps for backward (no checkpointing): attention block, post-attention RMSNorm
    (8h), the MLP's [× I] activations unless tiled (a tiled MLP recomputes them per chunk)."""
    mlp = 0.0 if s.features.tiled_mlp_chunks is not None else mlp_saved_per_token(m) * n
    return (attention_saved_per_token(s, m) + norm_saved_per_token(s, m)) * n + mlp


def layer_backward_bytes(s: Setup, m: Shape, n: int) -> float:
    """Peak of one layer's (recompute +) backward: the attention block's saved tensors plus the largest of
    MLP backward: post-attention RMSNorm's saved tensors (8h; tiled 4h: norm_saved_per_token, traced at
    Llama-3.1-8B SP 8, 1M tokens), incoming and MLP-input gradients (4h), and per MLP
    token the MLP's saved 8I plus 4I of gradients;
    post-attention RMSNorm backward: its fp32 input (4h), the residual gradient (2h), RMSNORM_BACKWARD_TEMPS fp32
    [n × h] temporaries (tiled: the residual and input gradients, 4h, and those temporaries for one chunk);
    attention backward (post-attention norm already freed): `attention_backward_bytes`."""
    h = m.hidden
    mlp_phase = (norm_saved_per_token(s, m) + 4 * h) * n + (mlp_saved_per_token(m) + 2 * ACT * m.intermediate) * mlp_tokens(s, m, n)
    chunk = s.features.tiled_norm_chunk
    norm_phase = ((4 * h + 2 * h + RMSNORM_BACKWARD_TEMPS * 4 * h) * n if chunk is None
                  else 4 * h * n + RMSNORM_BACKWARD_TEMPS * 4 * h * min(n, chunk))
    return attention_saved_per_token(s, m) * n + max(mlp_phase, norm_phase, attention_backward_bytes(s, m, n))


def checkpoint_bytes(s: Setup, m: Shape, n: int) -> float:
    """Stored hidden states on the GPU: with checkpointing one [n × h] bf16 per layer (offloaded: only
    CKPT_OFFLOAD_RESIDENT_LAYERS of them); without, every layer's saved activations."""
    if not s.features.gradient_checkpointing:
        return m.layers * layer_saved_bytes(s, m, n)
    layers = CKPT_OFFLOAD_RESIDENT_LAYERS if s.features.checkpoint_offload else m.layers
    return min(layers, m.layers) * n * m.hidden * ACT


def final_hidden_bytes(s: Setup, m: Shape, n: int) -> float:
    """Final RMSNorm's saved tensors and the gradient flowing into it (2h), per token: 6h + 2h for transformers'
    RMSNorm (calibrated on the H200 measurements, whose peaks are in the loss); tiled, its input, output and
    that gradient (3 × 2h, traced)."""
    return (8 if s.features.tiled_norm_chunk is None else 6) * m.hidden * n


def loss_bytes(s: Setup, m: Shape, n: int) -> float:
    """Logits, log-softmax and their gradients at the loss's backward: LOGITS_COPIES fp32 × vocab for every
    token untiled, for one chunk tiled (plus fp32 per-token log-probs and their gradient, 8 B/token)."""
    chunk = s.features.tiled_loss_chunk
    if chunk is None:
        return LOGITS_COPIES * 4 * m.vocab * n
    # Tiled, the lm_head weight gradient (vocab × hidden, 2 B) exists from the first chunk's backward on, while
    # chunks' logits are still alive (found by the CPU trace, spbench/memory/trace.py; untiled it appears after);
    # from the second chunk on, autograd adds each chunk's into the sum out of place: LM_HEAD_GRAD_COPIES at once.
    grad = 2 * m.vocab * m.hidden
    accumulate = LM_HEAD_GRAD_COPIES * grad if n > chunk else 0.0
    return max(LOGITS_COPIES * 4 * m.vocab * min(n, chunk) + grad, accumulate) + 8 * n


def reference_forward_bytes(s: Setup, m: Shape, n: int) -> float:
    """DPO reference forward under no_grad (nothing stored): a layer's live tensors (residual + hidden 4h,
    RMSNorm fp32 8h, q/k/v/out 4h + 2·2·Hk·d, MLP gate/up/act 6I per MLP token) and the logits
    (REF_LOGITS_COPIES, tiled or not)."""
    if s.stage != "dpo":
        return 0.0
    layer = (16 * m.hidden + 2 * ACT * kv_heads_local(s, m) * m.head_dim) * n
    layer += 3 * ACT * m.intermediate * mlp_tokens(s, m, n)
    chunk = s.features.tiled_loss_chunk
    logits = REF_LOGITS_COPIES * 4 * m.vocab * (n if chunk is None else min(n, chunk))
    return layer + max(logits, 0.0) + final_hidden_bytes(s, m, n)
