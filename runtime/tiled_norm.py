"""Tiled RMSNorm: transformers' Llama-style RMSNorm over token chunks, with its own backward that recomputes per chunk.

transformers' `LlamaRMSNorm` / `Qwen2RMSNorm` (and every class whose forward is the same code) compute

    h = x.to(float32); r = rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); out = weight * (h * r).to(x.dtype)

and autograd keeps h (4 B per element) and the cast (2 B in bf16) for backward, whose pow / mean / mul / cast
gradients then hold about five fp32 [tokens × hidden] temporaries at once: in a fake-tensor trace of Qwen2.5-7B
at 2M tokens, SP 8, the last layer's post-attention norm backward is the step's activation peak.

`TiledRMSNorm` replaces each such module *in the user's model instance* (transformers' classes are untouched;
the parameter stays the same `weight` Parameter object, so state-dict keys, checkpoints, the optimizer and
ZeRO-3's partition are unchanged). x [..., s, h] is viewed as rows [N, h] (N = tokens of all rows), cut into
chunks of `chunk_tokens` rows (the last one ragged):

  forward   per chunk, HF's ops in HF's order and dtypes → out [N, h] (bitwise HF's, any dtype); saves x as it
            is (the caller holds it anyway: the residual stream) and rstd = r, fp32 [N, 1]
  backward  per chunk: h and (h·r) recomputed, the gradient of each of HF's ops in autograd's own formula and
            order (mul → cast → rsqrt → mean → pow; see `backward_chunk`), so dx is bitwise autograd's of HF's
            module; dweight = Σ_chunks Σ_rows dy · (h·r).to(x.dtype), accumulated in fp32 (float64 for float64
            weights) and cast once — autograd sums all rows in one reduction, so dweight equals it to rounding

Only one chunk's fp32 temporaries exist at a time (three [chunk × h] in backward). The weight is an input of the
autograd Function, so its gradient arrives once per call (DeepSpeed's per-parameter reduction hooks fire once)
and DeepSpeed ZeRO-3 gathers it by its usual module hooks (the module's forward uses it; its backward hook
re-gathers before this backward runs). Per-layer checkpointing (non-reentrant) saves x, weight and rstd through
its hooks and recomputes them like any op's. Without gradients (DPO's reference, evaluation) only the chunked
forward runs. The chunk count may differ between ranks: no module is called per chunk (unlike the tiled MLP, F11).
"""
from __future__ import annotations

import torch
from torch import nn


def norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's RMSNorm of rows x2 [N, h] in chunks of `chunk` rows → (out [N, h] in HF's result dtype, rstd fp32 [N, 1])."""
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x2), device=x2.device)
    rstd = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x2.device)
    for start in range(0, x2.shape[0], chunk):
        rows = slice(start, start + chunk)
        h = x2[rows].to(torch.float32)                                       # [c, h] fp32
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)               # [c, 1]
        torch.mul(weight, (h * r).to(x2.dtype), out=out[rows])               # HF: weight * h.to(input_dtype)
        rstd[rows] = r
    return out, rstd


def backward_chunk(x: torch.Tensor, r: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dL/dx [c, h] of one chunk, in autograd's formulas for HF's ops (torch derivatives.yaml), so bitwise its:
    mul: g = (dy·w) → cast back through .to(x.dtype) and .to(float32); h·r: g·r and Σ_h g·h; rsqrt: −0.5·grad·r³;
    mean: grad / h; pow(2): grad · 2h; the two gradients of h added; .to(float32)'s backward casts to x.dtype."""
    h = x.to(torch.float32)                                                   # [c, h] (x itself when x is fp32)
    g = (dy * weight).to(x.dtype).to(torch.float32)                           # [c, h] a fresh tensor: in place ok
    g_var = (-0.5 * (g * h).sum(-1, keepdim=True) * r.pow(3)) / x.shape[-1]   # [c, 1]
    g.mul_(r).add_(h.mul(2).mul_(g_var))                                      # g·r + g_var·2h
    return g.to(x.dtype)


def norm_backward(x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy2: torch.Tensor, chunk: int,
                  need_x: bool, need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx [N, h] or None, dL/dweight [h] in weight.dtype or None), one chunk of rows at a time."""
    dx = torch.empty_like(x2) if need_x else None
    acc = torch.promote_types(weight.dtype, torch.float32)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    for start in range(0, x2.shape[0], chunk):
        rows = slice(start, start + chunk)
        xc, r, dyc = x2[rows], rstd[rows], dy2[rows]                          # [c, h], [c, 1], [c, h]
        if need_w:  # autograd: (dy · other) summed over rows, `other` the cast normalised input
            dw += (dyc * (xc.to(torch.float32) * r).to(x2.dtype)).sum(0, dtype=acc)
        if need_x:
            dx[rows] = backward_chunk(xc, r, dyc, weight)
    return dx, None if dw is None else dw.to(weight.dtype)


class _TiledRMSNormFn(torch.autograd.Function):
    """Saves x, weight and rstd; forward and backward delegate to norm_forward / norm_backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, chunk: int):
        out, rstd = norm_forward(x.reshape(-1, x.shape[-1]), weight, eps, chunk)   # [..., s, h] → [N, h]
        ctx.save_for_backward(x, weight, rstd)
        ctx.chunk = chunk
        return out.view(x.shape)                                                  # [N, h] → [..., s, h]

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        dy2 = grad_out.reshape(-1, x.shape[-1])
        dx, dw = norm_backward(x.reshape(-1, x.shape[-1]), weight, rstd, dy2, ctx.chunk, *ctx.needs_input_grad[:2])
        return (None if dx is None else dx.view(x.shape)), dw, None, None


class TiledRMSNorm(nn.Module):
    """transformers' RMSNorm over chunks of `chunk_tokens` tokens (module doc); `weight` is the replaced module's
    own Parameter. Made by `apply_tiled_norm`; `remove_tiled_norm` puts the original module back."""

    def __init__(self, norm: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(_eps_of(norm))
        self.chunk_tokens = chunk_tokens
        self._original = (norm,)  # a tuple, not a submodule: the weight is registered once (state-dict keys)

    @property
    def chunk_tokens(self) -> int:
        return self._chunk_tokens

    @chunk_tokens.setter
    def chunk_tokens(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"TiledRMSNorm chunk_tokens must be an int >= 1, got {n!r}")
        self._chunk_tokens = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _TiledRMSNormFn.apply(x, self.weight, self.variance_epsilon, self.chunk_tokens)
        out, _ = norm_forward(x.reshape(-1, x.shape[-1]), self.weight, self.variance_epsilon, self.chunk_tokens)
        return out.view(x.shape)

    def original(self) -> nn.Module:
        """The replaced module, its `weight` set to this module's current Parameter."""
        norm = self._original[0]
        norm.weight = self.weight
        return norm

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, chunk_tokens={self.chunk_tokens}"


def _eps_of(norm: nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def _is_llama_rmsnorm(norm: nn.Module) -> bool:
    """Whether `norm`'s forward is transformers' LlamaRMSNorm forward (same bytecode, names and constants): the
    class name is no proof — GemmaRMSNorm scales by 1 + weight, Olmo2RMSNorm multiplies before the cast."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref, code = LlamaRMSNorm.forward.__code__, getattr(type(norm).forward, "__code__", None)
    same = code is not None and (code.co_code, code.co_names, code.co_consts) == (ref.co_code, ref.co_names, ref.co_consts)
    return same and isinstance(getattr(norm, "weight", None), nn.Parameter) and hasattr(norm, "variance_epsilon")


def _norm_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every RMSNorm-named or tiled child: the decoder layers' input_layernorm and
    post_attention_layernorm and the final model.norm in Qwen2/Llama (Qwen3's q_norm / k_norm too)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, TiledRMSNorm) or type(child).__name__.endswith("RMSNorm")]


def apply_tiled_norm(model: nn.Module, chunk_tokens: int) -> int:
    """Replace every Llama-style RMSNorm of `model` by `TiledRMSNorm(norm, chunk_tokens)` (or update the chunk if
    replaced already). Module replacement in this instance only. Returns how many norms are tiled."""
    slots = _norm_slots(model)
    other = sorted({type(c).__name__ for _, _, c in slots if not isinstance(c, TiledRMSNorm) and not _is_llama_rmsnorm(c)})
    if other or not slots:
        found = f"its norms {', '.join(other)} compute something else" if other else "it has no RMSNorm module"
        raise ValueError(f"tiled RMSNorm needs transformers' Llama-style RMSNorm (Llama, Qwen2/3, Mistral, Phi-3); "
                         f"{type(model).__name__}: {found}; set tiled_norm_chunk: null")
    for parent, name, child in slots:
        if isinstance(child, TiledRMSNorm):
            child.chunk_tokens = chunk_tokens
        else:
            setattr(parent, name, TiledRMSNorm(child, chunk_tokens))
    return len(slots)


def remove_tiled_norm(model: nn.Module) -> int:
    """Undo `apply_tiled_norm`: put the original norm modules back. Returns how many were restored."""
    slots = [(p, n, c) for p, n, c in _norm_slots(model) if isinstance(c, TiledRMSNorm)]
    for parent, name, child in slots:
        setattr(parent, name, child.original())
    return len(slots)
