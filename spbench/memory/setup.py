"""What the memory model describes: a model's shape and one training setup per GPU.

`Setup` is the memory model's input (memory/model.py); `Setup.from_config` derives it from a `TrainConfig`,
so the memory model sees the features and token counts the trainer resolves (tests/test_memmodel.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.attention import METHODS, resolve_ulysses
from runtime.memory import MemoryFeatures, shard_tokens
from runtime.models import head_counts, model_config
from runtime.topology import TopologyError

from ..common.deepspeed import check_offload
from ..common.units import GiB

CUDA_CONTEXT_GIB = 0.5
"""Device memory the allocator cannot use (CUDA context, NCCL/driver reservations)."""

ALLOCATOR_HEADROOM = 0.05
"""Fraction of the rest lost to caching-allocator fragmentation. With it the usable part of a 139 GiB H200
is 131.6 GiB: every measured success (≤ 119.6 GiB) fits and the 3B SFT 64k OOM (predicted 137.8 GiB
allocated) does not. Not separately measured."""

STAGES = ("sft", "dpo")
GPU_KERNELS = ("cuda-cudnn", "cuda-flash", "flash-attn")
"""The GPU attention kernels the memory model knows; the first is the default (the runtime's auto on a GPU)."""
MODELLED_KERNELS = (*GPU_KERNELS, "cpu-flash")
"""Every kernel Setup.attention_kernel takes: the GPU ones and the fake-tensor trace's own."""
FINETUNING = ("full", "lora")
SP_METHODS = ("auto", *METHODS)
"""The runtime's strategies, or auto: ulysses when the runtime can split the model's heads over the SP size,
else hybrid (ulysses = gcd, ring = the rest: the runtime's own rule)."""


def runnable_method(sp: int, heads: int, kv_heads: int) -> str:
    """The strategy `auto` means for this SP size and head counts: ulysses if the runtime accepts it, else hybrid."""
    try:
        resolve_ulysses("ulysses", sp, heads, kv_heads)
    except TopologyError:
        return "hybrid"
    return "ulysses"


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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer (Qwen2/Llama names), what LoRA may adapt."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def adapter_params(self, rank: int, target: str = "all") -> int:
        """Parameters LoRA adds: r × (in + out) per adapted linear layer, every decoder layer (peft's count;
        tests/test_memmodel.py holds it equal on a preset). `target`: all or comma-separated module names."""
        shapes = self.linear_shapes()
        names = list(shapes) if target == "all" else [n.strip() for n in target.split(",") if n.strip()]
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(f"lora target {', '.join(unknown)} unknown to the memory model; known: all, {', '.join(shapes)}")
        return self.layers * sum(rank * sum(shapes[n]) for n in names)


def shape_of(model: str) -> Shape:
    """`Shape` of a preset name or local checkpoint dir (raises runtime.models.ModelError if neither)."""
    c = model_config(model)
    heads, kv_heads = head_counts(c)
    return Shape(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads, kv_heads=kv_heads,
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
    sp_method: str = "auto"
    first_step: bool = False
    batch: int = 1
    """Sequences (DPO: pairs) per micro-batch, per_device_train_batch_size."""
    finetuning: str = "full"
    """full | lora: with lora only the adapters have gradients and optimizer states, and DPO has no second model."""
    lora_rank: int = 8
    lora_target: str = "all"
    attention_kernel: str = "cuda-cudnn"
    """The runtime's attention kernel (runtime/attention/kernels.py names): cuda-cudnn, what `auto` picks on a GPU, and
    cuda-flash expand K/V to every head for GQA; flash-attn takes GQA as it is; cpu-flash is what the fake-tensor
    trace runs (GQA native, no CUDA accumulator), for checking the model against a trace (memory/traced.py)."""
    ulysses: int = field(init=False, default=1)
    """The Ulysses degree the runtime resolves for sp_method (ring degree = sp / ulysses)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "offload", frozenset(self.offload))
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} unknown; choose from {', '.join(STAGES)}")
        if self.finetuning not in FINETUNING or self.lora_rank < 1:
            raise ValueError(f"finetuning {self.finetuning!r} (rank {self.lora_rank}): use full or lora, rank >= 1")
        if self.gpus < 1 or self.sp < 1 or self.gpus % self.sp:
            raise ValueError(f"sp={self.sp} must be >= 1 and divide gpus={self.gpus}")
        check_offload(self.zero, tuple(sorted(self.offload)))
        if self.attention_kernel not in MODELLED_KERNELS:
            raise ValueError(f"attention_kernel {self.attention_kernel!r} unknown; use {', '.join(MODELLED_KERNELS)}")
        if self.sp_method not in SP_METHODS:
            raise ValueError(f"sp_method {self.sp_method!r} unknown; choose from {', '.join(SP_METHODS)}")
        m = shape_of(self.model)
        if self.sp_method == "auto":
            object.__setattr__(self, "sp_method", runnable_method(self.sp, m.heads, m.kv_heads))
        # the runtime's own rule: a setup it would refuse raises its TopologyError, never gets estimated
        object.__setattr__(self, "ulysses", resolve_ulysses(self.sp_method, self.sp, m.heads, m.kv_heads))
        if self.gpu_mem_gib <= CUDA_CONTEXT_GIB:
            raise ValueError(f"gpu_mem_gib={self.gpu_mem_gib} too small (must exceed {CUDA_CONTEXT_GIB})")

    def trained_params(self, m: Shape) -> int:
        """Parameters with gradients and optimizer states: all (full) or the LoRA adapters'."""
        return m.params if self.finetuning == "full" else m.adapter_params(self.lora_rank, self.lora_target)

    @property
    def rows(self) -> int:
        """Rows per micro-batch, as the trainer counts them (TrainConfig.rows_per_micro_batch)."""
        return self.batch * (2 if self.stage == "dpo" else 1)

    @classmethod
    def from_config(cls, cfg, gpus: int, gpu_mem_gib: float = 80.0) -> "Setup":
        """The memory model's description of the run `cfg` (a runtime TrainConfig) on `gpus` GPUs: the same
        memory features, rows, strategy and SP degrees the trainer resolves; ZeRO stage and offload from its
        DeepSpeed file."""
        from ..common.deepspeed import read_deepspeed

        method = cfg.sequence_parallel_mode
        zero, offload = read_deepspeed(cfg.deepspeed) if cfg.deepspeed else (0, ())
        return cls(cfg.model_name_or_path, cfg.stage, gpus, gpu_mem_gib, cfg.sequence_parallel_size, zero,
                   frozenset(offload), cfg.memory_features, method, batch=cfg.per_device_train_batch_size,
                   finetuning=cfg.finetuning_type, lora_rank=cfg.lora_rank, lora_target=cfg.lora_target)


def tokens_per_gpu(setup: Setup, length: int) -> int:
    """Tokens one GPU holds: rows × ceil(length / sp) (each sequence is split over the SP group), as the
    trainer counts them (runtime.memory.shard_tokens)."""
    return shard_tokens(length, setup.sp, setup.rows)


def usable_bytes(gpu_mem_gib: float) -> float:
    """Bytes the allocator can hand out on a GPU of `gpu_mem_gib` (context and fragmentation removed)."""
    return (gpu_mem_gib - CUDA_CONTEXT_GIB) * (1 - ALLOCATOR_HEADROOM) * GiB
