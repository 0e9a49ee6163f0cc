"""Analytic per-GPU peak-memory model of one full-parameter SFT or DPO training step.

The peak is the largest of four phases of a step, each a sum of named terms (bytes per GPU):

  reference  (DPO) static + the frozen reference model's no-grad forward (nothing stored)
  loss       static + checkpointed hidden states + final norm + logits/log-softmax and its gradient
  layers     static + one layer's recompute + backward, SP buffers, checkpoints or the gradients so far
  step       static + gradients + the optimizer's temporaries

Static memory follows the optimizer setup: `zero=0` is no DeepSpeed, torch AdamW on the bf16
weights (states in bf16: 2+2+2+2 B/param, every GPU a replica; the measured plain runs);
`zero=2|3` is DeepSpeed bf16 mixed precision (fp32 master + fp32 m, v: 12 B/param, sharded over
all GPUs; ZeRO-3 also shards the bf16 weights), `offload` moves optimizer states / weights to CPU.
Activations scale with the tokens one GPU holds, n = rows × ceil(length / sp) (DPO: rows = 2,
chosen + rejected, `length` per sequence). Byte counts per token are written out per term below
(h hidden, L layers, H/Hk heads/kv heads, d head dim, I intermediate, V vocab; activations bf16).

Calibrated against reports/measurements/h200-2026-11-28-plain.json (tests/test_memmodel.py):
every constant below says where it comes from. The model is monotone in length, which
`maxlen_estimate` relies on for its bisection.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.memory import AUTO, MemoryFeatures
from runtime.models import model_config

GiB = 2**30
ACT = 2  # bytes per activation element (bf16)

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

CUDA_CONTEXT_GIB = 0.5
"""Device memory the allocator cannot use (CUDA context, NCCL/driver reservations)."""

ALLOCATOR_HEADROOM = 0.05
"""Fraction of the rest lost to caching-allocator fragmentation. With it the usable part of a 139 GiB H200
is 131.6 GiB: every measured success (≤ 119.6 GiB) fits and the 3B SFT 64k OOM (predicted 137.8 GiB
allocated) does not. Not separately measured."""

REDUCE_BUCKET_ELEMS = 500_000_000
"""DeepSpeed's default reduce_bucket_size (elements, bf16) for ZeRO-2/3 gradient reduction."""

ZERO3_LIVE_MODULES = 2
"""ZeRO-3 gathers the module being computed plus one prefetched (largest: a layer or the embedding)."""

CKPT_OFFLOAD_RESIDENT_LAYERS = 2
"""With checkpoint offload, checkpointed hidden states on the GPU: the one in use and one in transfer."""

STAGES = ("sft", "dpo")
ZERO_STAGES = (0, 2, 3)
OFFLOADS = ("optimizer", "param")
SP_METHODS = ("ulysses", "ring")


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the model needs (from a preset or a checkpoint's config)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        """Total parameter count (embedding, lm_head unless tied, layers, final norm)."""
        head = 0 if self.tied else self.embed_params
        return self.embed_params + head + self.layers * self.layer_params + self.hidden


def shape_of(model: str) -> Shape:
    """`Shape` of a preset name or local checkpoint dir (raises runtime.models.ModelError if neither)."""
    c = model_config(model)
    heads = c.num_attention_heads
    return Shape(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                 kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                 head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                 intermediate=c.intermediate_size, vocab=c.vocab_size, tied=bool(c.tie_word_embeddings),
                 qkv_bias=bool(getattr(c, "attention_bias", c.model_type == "qwen2")))


@dataclass(frozen=True)
class Setup:
    """One training configuration, per GPU. `first_step`: the peak of a run's first step, before AdamW has
    created its states (zero=0 only: DeepSpeed allocates them at initialisation)."""

    model: str
    stage: str = "sft"
    gpus: int = 1
    gpu_mem_gib: float = 80.0
    sp: int = 1
    zero: int = 0
    offload: frozenset = frozenset()
    features: MemoryFeatures = field(default_factory=MemoryFeatures)
    sp_method: str = "ulysses"
    first_step: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "offload", frozenset(self.offload))
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} unknown; choose from {', '.join(STAGES)}")
        if self.gpus < 1 or self.sp < 1 or self.gpus % self.sp:
            raise ValueError(f"sp={self.sp} must be >= 1 and divide gpus={self.gpus}")
        if self.zero not in ZERO_STAGES:
            raise ValueError(f"zero={self.zero} unsupported; choose from {', '.join(map(str, ZERO_STAGES))}")
        if not self.offload <= set(OFFLOADS):
            raise ValueError(f"offload {sorted(self.offload)} unknown; choose from none, {', '.join(OFFLOADS)}")
        if self.offload and self.zero == 0:
            raise ValueError("offload needs DeepSpeed ZeRO: use zero 2 or 3 (param offload: zero 3)")
        if "param" in self.offload and self.zero != 3:
            raise ValueError(f"param offload needs zero 3, got zero {self.zero}")
        if self.sp_method not in SP_METHODS:
            raise ValueError(f"sp_method {self.sp_method!r} unknown; choose from {', '.join(SP_METHODS)}")
        if self.gpu_mem_gib <= CUDA_CONTEXT_GIB:
            raise ValueError(f"gpu_mem_gib={self.gpu_mem_gib} too small (must exceed {CUDA_CONTEXT_GIB})")

    @property
    def rows(self) -> int:
        return 2 if self.stage == "dpo" else 1


def tokens_per_gpu(setup: Setup, length: int) -> int:
    """Tokens one GPU holds: rows × ceil(length / sp) (each sequence is split over the SP group)."""
    return setup.rows * math.ceil(length / setup.sp)


def usable_bytes(gpu_mem_gib: float) -> float:
    """Bytes the allocator can hand out on a GPU of `gpu_mem_gib` (context and fragmentation removed)."""
    return (gpu_mem_gib - CUDA_CONTEXT_GIB) * (1 - ALLOCATOR_HEADROOM) * GiB


# ----------------------------------------------------------------------------------- static terms (bytes)
def param_bytes(s: Setup, m: Shape) -> float:
    """bf16 weights of the policy resident on this GPU: full (zero 0/2), 1/gpus (zero 3), 0 (param offload)."""
    if "param" in s.offload:
        return 0.0
    return 2.0 * m.params / (s.gpus if s.zero == 3 else 1)


def reference_param_bytes(s: Setup, m: Shape) -> float:
    """DPO: the frozen reference model's bf16 weights, placed like the policy's (no optimizer, no grads)."""
    return param_bytes(s, m) if s.stage == "dpo" else 0.0


def gathered_param_bytes(s: Setup, m: Shape) -> float:
    """ZeRO-3: full bf16 weights of the modules being computed (current + prefetched)."""
    if s.zero != 3:
        return 0.0
    return ZERO3_LIVE_MODULES * 2.0 * max(m.layer_params, m.embed_params)


def optimizer_bytes(s: Setup, m: Shape) -> float:
    """AdamW states on this GPU: bf16 m, v (zero 0: 4 B/param); fp32 master + m + v (12 B/param / gpus)."""
    if s.zero == 0:
        return 4.0 * m.params
    return 0.0 if "optimizer" in s.offload else 12.0 * m.params / s.gpus


def grad_bytes(s: Setup, m: Shape) -> float:
    """Gradients held on this GPU once backward has produced them: full bf16 (zero 0), else this rank's
    bf16 partition (on CPU with optimizer offload) plus one reduce bucket."""
    if s.zero == 0:
        return 2.0 * m.params
    part = 0.0 if "optimizer" in s.offload else 2.0 * m.params / s.gpus
    return part + 2.0 * min(REDUCE_BUCKET_ELEMS, m.params)


def step_temp_bytes(s: Setup, m: Shape) -> float:
    """Optimizer-step temporaries: torch foreach AdamW's parameter-sized buffer (zero 0), the fp32 copy of the
    gradient partition (ZeRO on GPU), nothing on the GPU for CPU Adam (optimizer offload)."""
    if s.zero == 0:
        return FOREACH_TEMP_COPIES * 2.0 * m.params
    return 0.0 if "optimizer" in s.offload else 4.0 * m.params / s.gpus


def workspace_bytes() -> float:
    """Fixed workspace (see WORKSPACE_GIB)."""
    return WORKSPACE_GIB * GiB


def host_bytes(s: Setup, m: Shape, n: int) -> float:
    """CPU memory this GPU's rank needs: offloaded optimizer (fp32 master, m, v, fp32 grads: 16 B/param/gpus),
    offloaded weights (policy and reference), offloaded checkpoints (layers × n × h × 2 B)."""
    b = 16.0 * m.params / s.gpus if "optimizer" in s.offload else 0.0
    if "param" in s.offload:
        b += 2.0 * m.params / s.gpus * s.rows
    if s.features.checkpoint_offload and s.features.gradient_checkpointing:
        b += m.layers * n * m.hidden * ACT
    return b


# ------------------------------------------------------------------------------ activation terms (bytes)
def kv_heads_local(s: Setup, m: Shape) -> int:
    """kv heads a GPU's attention sees, summed over the full sequence: Ulysses replicates kv heads up to the
    SP degree (DESIGN.md), ring keeps them."""
    return max(m.kv_heads, s.sp) if s.sp_method == "ulysses" and s.sp > 1 else m.kv_heads


def attention_saved_per_token(s: Setup, m: Shape) -> float:
    """What one layer's attention block saves for backward, per token: input RMSNorm (fp32 input 4h + bf16
    output 2h), q after RoPE (2h), k and v (2·2·Hk·d), attention output (2h) and its transposed copy fed
    to o_proj (2h), fp32 log-sum-exp (4H)."""
    h = m.hidden
    return 6 * h + 2 * h + 2 * ACT * kv_heads_local(s, m) * m.head_dim + 2 * h + 2 * h + 4 * m.heads


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
    (6h), the MLP's [× I] activations unless tiled (a tiled MLP recomputes them per chunk)."""
    mlp = 0.0 if s.features.tiled_mlp_chunks is not None else mlp_saved_per_token(m) * n
    return (attention_saved_per_token(s, m) + 6 * m.hidden) * n + mlp


def layer_backward_bytes(s: Setup, m: Shape, n: int) -> float:
    """Peak of one layer's (recompute +) backward: the attention block's saved tensors plus the larger of
    MLP backward: post-attention RMSNorm's saved 6h, incoming and MLP-input gradients (4h), and per MLP
    token the MLP's saved 8I plus 4I of gradients;
    attention backward (post-attention norm already freed): residual and output gradients, flash's fp32 dq
    accumulator, dq/dk/dv (2h + 2h + 4h + 2h + 2·2·Hk'·d)."""
    h = m.hidden
    mlp_phase = 10 * h * n + (mlp_saved_per_token(m) + 2 * ACT * m.intermediate) * mlp_tokens(s, m, n)
    attn_phase = (10 * h + 2 * ACT * kv_heads_local(s, m) * m.head_dim) * n
    return attention_saved_per_token(s, m) * n + max(mlp_phase, attn_phase)


def checkpoint_bytes(s: Setup, m: Shape, n: int) -> float:
    """Stored hidden states on the GPU: with checkpointing one [n × h] bf16 per layer (offloaded: only
    CKPT_OFFLOAD_RESIDENT_LAYERS of them); without, every layer's saved activations."""
    if not s.features.gradient_checkpointing:
        return m.layers * layer_saved_bytes(s, m, n)
    layers = CKPT_OFFLOAD_RESIDENT_LAYERS if s.features.checkpoint_offload else m.layers
    return min(layers, m.layers) * n * m.hidden * ACT


def final_hidden_bytes(m: Shape, n: int) -> float:
    """Final RMSNorm's saved tensors (6h) and the gradient flowing into it (2h), per token."""
    return 8 * m.hidden * n


def loss_bytes(s: Setup, m: Shape, n: int) -> float:
    """Logits, log-softmax and their gradients at the loss's backward: LOGITS_COPIES fp32 × vocab for every
    token untiled, for one chunk tiled (plus fp32 per-token log-probs and their gradient, 8 B/token)."""
    chunk = s.features.tiled_loss_chunk
    if chunk is None:
        return LOGITS_COPIES * 4 * m.vocab * n
    # Tiled, the lm_head weight gradient (vocab × hidden, 2 B) exists from the first chunk's backward on, while
    # chunks' logits are still alive (found by the CPU trace, spbench/memtrace.py; untiled it appears after).
    return LOGITS_COPIES * 4 * m.vocab * min(n, chunk) + 8 * n + 2 * m.vocab * m.hidden


def sp_buffer_bytes(s: Setup, m: Shape, n: int) -> float:
    """SP communication buffers during attention. Ulysses: all-to-all send + receive copies of q, k, v
    (2 × (2h + 2·2·Hk'·d) per token, Hk' the replicated kv heads). Ring: the current and the next K/V block
    (2 × 2·2·Hk·d) and fp32 dK/dV accumulators (2·4·Hk·d) per token. None without SP."""
    if s.sp == 1:
        return 0.0
    if s.sp_method == "ulysses":
        return 2 * (2 * m.hidden + 2 * ACT * kv_heads_local(s, m) * m.head_dim) * n
    kv = m.kv_heads * m.head_dim
    return (2 * 2 * ACT * kv + 2 * 4 * kv) * n


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
    return layer + max(logits, 0.0) + final_hidden_bytes(m, n)


# ------------------------------------------------------------------------------------------ the model
def peak_memory(setup: Setup, length: int, shape: Shape | None = None) -> dict:
    """Predicted peak device memory of one training step at `length` tokens per sequence.

    Returns {"total_gib", "phase" (the phase that peaks), "phases": {phase: GiB}, "terms": {term: GiB},
    "host_gib" (CPU memory per rank), "tokens_per_gpu", "fits" (total ≤ usable memory of the GPU)}.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    s, m = setup, shape or shape_of(setup.model)
    n = tokens_per_gpu(s, length)
    states = 0.0 if (s.first_step and s.zero == 0) else optimizer_bytes(s, m)
    t = {
        "params": param_bytes(s, m),
        "reference_params": reference_param_bytes(s, m),
        "gathered_params": gathered_param_bytes(s, m),
        "optimizer_states": states,
        "workspace": workspace_bytes(),
        "grads": grad_bytes(s, m),
        "step_temp": step_temp_bytes(s, m),
        "checkpoints": checkpoint_bytes(s, m, n),
        "checkpoint_one_layer": n * m.hidden * ACT if s.features.gradient_checkpointing else 0.0,
        "final_hidden": final_hidden_bytes(m, n),
        "loss": loss_bytes(s, m, n),
        "layer_backward": layer_backward_bytes(s, m, n),
        "sp_buffers": sp_buffer_bytes(s, m, n),
        "reference_forward": reference_forward_bytes(s, m, n),
    }
    base = t["params"] + t["reference_params"] + t["gathered_params"] + t["optimizer_states"] + t["workspace"]
    # DeepSpeed allocates its gradient partition and bucket up front; zero 0 grads appear during backward
    early = t["grads"] if s.zero else 0.0
    late = 0.0 if s.zero else t["grads"]
    phases = {
        "reference": base + early + t["reference_forward"] if s.stage == "dpo" else 0.0,
        "loss": base + early + t["checkpoints"] + t["final_hidden"] + t["loss"],
        "layers": base + early + t["layer_backward"] + t["sp_buffers"]
        + max(t["checkpoints"], t["checkpoint_one_layer"] + late),
        "step": base - t["optimizer_states"] + optimizer_bytes(s, m) + t["grads"] + t["step_temp"],
    }
    phase = max(phases, key=phases.get)
    total = phases[phase]
    return {
        "total_gib": total / GiB,
        "phase": phase,
        "phases": {k: v / GiB for k, v in phases.items()},
        "terms": {k: v / GiB for k, v in t.items()},
        "host_gib": host_bytes(s, m, n) / GiB,
        "tokens_per_gpu": n,
        "fits": total <= usable_bytes(s.gpu_mem_gib),
    }


def maxlen_estimate(model: str, stage: str, gpus: int, gpu_mem_gib: float, sp: int, zero: int,
                    offload=frozenset(), features: MemoryFeatures | None = None, *, sp_method: str = "ulysses",
                    resolution: int = 1024, cap: int = 2**28) -> int:
    """Largest length (per sequence, a multiple of `resolution`) whose predicted peak fits the GPU; 0 if even
    `resolution` tokens do not fit. Bisection over the monotone model between `resolution` and `cap`."""
    setup = Setup(model, stage, gpus, gpu_mem_gib, sp, zero, frozenset(offload),
                  features if features is not None else MemoryFeatures(), sp_method)
    return maxlen_for(setup, resolution=resolution, cap=cap)


def maxlen_for(setup: Setup, *, resolution: int = 1024, cap: int = 2**28) -> int:
    """`maxlen_estimate` for a `Setup`."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    shape = shape_of(setup.model)
    fits = lambda k: peak_memory(setup, k * resolution, shape)["fits"]  # noqa: E731
    lo, hi = 0, cap // resolution + 1  # lo fits (0 trivially), hi does not (or is past the cap)
    if fits(hi - 1):
        return (hi - 1) * resolution
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * resolution


def with_features(setup: Setup, **changes) -> Setup:
    """A copy of `setup` whose MemoryFeatures have `changes` applied."""
    return replace(setup, features=replace(setup.features, **changes))


# --------------------------------------------------------------------------- checking against measurements
MEASUREMENTS = Path(__file__).resolve().parents[1] / "reports" / "measurements"


def compare_measurements(path: str | Path) -> list[dict]:
    """Predicted vs measured for every point of a measurements file (schema spbench.measurements/1).

    One dict per point: model, stage, length, oom, regime, measured_gib, predicted_gib (the point's regime),
    error (predicted / measured − 1; None for OOM points), predicted_fits (on the file's GPU).
    """
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != "spbench.measurements/1":
        raise ValueError(f"{path}: schema {doc.get('schema')!r} is not spbench.measurements/1")
    st = doc["setup"]
    rows = []
    for p in doc["points"]:
        regime = p.get("regime", "steady")
        setup = Setup(p["model"], p["stage"], st["gpus"], st["gpu_mem_gib"], st["sp"], st["zero"],
                      frozenset(st["offload"]), MemoryFeatures(**st["features"]), first_step=regime == "first_step")
        pred = peak_memory(setup, p["length"])
        meas = p.get("peak_gib")
        rows.append({"model": p["model"], "stage": p["stage"], "length": p["length"], "oom": bool(p["oom"]),
                     "regime": regime, "measured_gib": meas, "predicted_gib": pred["total_gib"],
                     "phase": pred["phase"], "error": None if meas is None else pred["total_gib"] / meas - 1,
                     "predicted_fits": pred["fits"]})
    return rows
