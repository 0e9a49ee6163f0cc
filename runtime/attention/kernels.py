"""Local attention kernels: each returns (out, lse) and has a backward that takes a *given* lse.

Shapes: q [b, H, sq, d], k/v [b, Hkv, sk, d] (H a multiple of Hkv, GQA handled inside),
out [b, H, sq, d], lse [b, H, sq] (natural log; float32 for 16-bit inputs).
`mask` is None or a bool tensor [b, sq, sk] (True = may attend); `causal` is the
top-left-aligned causal mask for sq == sk. A row with nothing to attend gets out = 0
and lse = −inf.

The backward takes `out` and `lse` as arguments instead of saving them, because ring
attention calls it per block with the *merged* (global) out and lse: then
P = exp(S − lse_global) are the true probabilities and the block's dq/dk/dv are exact.

Kernels: ``reference`` (pure torch, any dtype, O(sq·sk) memory; the float64 oracle),
``cpu-flash`` (aten's CPU flash op: float64/32/bf16, masks; ``cpu-flash-split``: the same op without masks, so
packed blocks take the split-by-document path CUDA takes), ``cuda-flash`` and
``cuda-cudnn`` (SDPA's CUDA ops) and ``flash-attn`` (the flash-attn ≥ 2.7 package, when
installed): 16-bit only, no masks — blockattn splits packed pairs by document for them.
``auto`` picks cuDNN on CUDA for 16-bit (601 vs 344 TFLOP/s for flash at 32k on H200,
see DESIGN.md), cpu-flash on CPU, reference otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError

aten = torch.ops.aten


@dataclass(frozen=True)
class Kernel:
    """A local attention kernel (see module doc for the calling convention)."""

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    supports_mask: bool


class KernelError(InputError):
    """A kernel that does not exist or cannot run on this device/dtype."""


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, Hkv, s, d] → [b, H, s, d]: query head h uses kv head h // (H/Hkv)."""
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _fold_kv(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Backward of `_expand_kv`: [b, H, s, d] → [b, Hkv, s, d] summing each group."""
    b, h, s, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _full_mask(mask: torch.Tensor | None, causal: bool, sq: int, sk: int, device) -> torch.Tensor | None:
    """Combine the document mask and the causal mask into one bool [b|1, sq, sk] (or None)."""
    if not causal:
        return mask
    tri = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
    return tri[None] if mask is None else mask & tri


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_forward(q, k, v, *, causal: bool, mask=None, scale: float):
    """Plain softmax attention in float64 (float64 inputs) or float32 (others)."""
    cd = _compute_dtype(q.dtype)
    qf, kf, vf = q.to(cd), _expand_kv(k, q.shape[1]).to(cd), _expand_kv(v, q.shape[1]).to(cd)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [b, H, sq, sk]
    m = _full_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    if m is not None:
        s = s.masked_fill(~m[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, H, sq]; −inf for rows with nothing to attend
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p, vf).to(q.dtype), lse


def reference_backward(dout, q, k, v, out, lse, *, causal: bool, mask=None, scale: float):
    """dS = P ∘ (dP − rowsum(dO ∘ O)), P = exp(S − lse) with the lse given."""
    cd = _compute_dtype(q.dtype)
    h, hkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.to(cd), _expand_kv(k, h).to(cd), _expand_kv(v, h).to(cd)
    do, o, lse = dout.to(cd), out.to(cd), lse.to(cd)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    m = _full_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    if m is not None:
        s = s.masked_fill(~m[:, None], float("-inf"))
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), do)  # [b, H, sk, d]
    dp = torch.matmul(do, vf.transpose(-1, -2))  # [b, H, sq, sk]
    delta = (do * o).sum(-1, keepdim=True)  # [b, H, sq, 1]
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    return dq.to(q.dtype), _fold_kv(dk, hkv).to(k.dtype), _fold_kv(dv, hkv).to(v.dtype)


def _additive(mask: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask [b, sq, sk] → (additive float mask [b, 1, sq, sk], rows with nothing to attend [b, sq]).

    Empty rows get a zero mask row (the CPU op would return lse = 0 for them, not −inf);
    callers fix those rows afterwards.
    """
    empty = ~mask.any(-1)
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    add = add.masked_fill(empty[..., None], 0.0)
    return add[:, None], empty


def cpu_flash_forward(q, k, v, *, causal: bool, mask=None, scale: float):
    if mask is None:
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    add, empty = _additive(_full_mask(mask, causal, q.shape[2], k.shape[2], q.device), q.dtype)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=add, scale=scale)
    out = out.masked_fill(empty[:, None, :, None], 0.0)
    return out, lse.masked_fill(empty[:, None], float("-inf"))


def cpu_flash_backward(dout, q, k, v, out, lse, *, causal: bool, mask=None, scale: float):
    if mask is None:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    add, empty = _additive(_full_mask(mask, causal, q.shape[2], k.shape[2], q.device), q.dtype)
    # Rows with no visible key contributed nothing: a zero dout row makes their dS zero.
    dout = dout.masked_fill(empty[:, None, :, None], 0.0)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, False, attn_mask=add, scale=scale
    )


def cuda_flash_forward(q, k, v, *, causal: bool, mask=None, scale: float):
    h = q.shape[1]
    res = aten._scaled_dot_product_flash_attention(q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, False, scale=scale)
    return res[0], res[1]


def cuda_flash_backward(dout, q, k, v, out, lse, *, causal: bool, mask=None, scale: float):
    h, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    cum = torch.empty(0, dtype=torch.int32, device=q.device)
    rng = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout.contiguous(), q, _expand_kv(k, h), _expand_kv(v, h), out.contiguous(), lse.float().contiguous(),
        cum, cum, sq, sk, 0.0, causal, rng, rng, scale=scale,
    )
    return dq, _fold_kv(dk, hkv), _fold_kv(dv, hkv)


def cuda_cudnn_forward(q, k, v, *, causal: bool, mask=None, scale: float):
    h = q.shape[1]
    res = aten._scaled_dot_product_cudnn_attention(q, _expand_kv(k, h), _expand_kv(v, h), None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3])


def cuda_cudnn_backward(dout, q, k, v, out, lse, *, causal: bool, mask=None, scale: float):
    h, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    cum = torch.empty(0, dtype=torch.int32, device=q.device)
    rng = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q, _expand_kv(k, h), _expand_kv(v, h), out.contiguous(),
        lse.float().reshape(*q.shape[:3], 1).contiguous(), rng, rng, None, cum, cum, sq, sk, 0.0, causal, scale=scale,
    )
    return dq, _fold_kv(dk, hkv), _fold_kv(dv, hkv)


def _flash_attn_interface():
    """flash-attn's low-level interface (forward/backward taking a given lse), imported on first use."""
    try:
        from flash_attn import flash_attn_interface
    except ImportError as err:
        raise KernelError(f"kernel 'flash-attn' needs the flash-attn package ({err}); "
                          "pip install 'spbench[gpu]' on a CUDA machine, or use --kernel auto") from None
    if not hasattr(flash_attn_interface, "_wrapped_flash_attn_forward"):
        raise KernelError("kernel 'flash-attn' needs flash-attn >= 2.7 (its forward/backward ops changed then)")
    return flash_attn_interface


def flash_attn_forward(q, k, v, *, causal: bool, mask=None, scale: float):
    # flash-attn works in [b, s, H, d] and handles GQA itself (kv heads dividing H).
    fa = _flash_attn_interface()
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        raise KernelError(f"kernel 'flash-attn' needs a head dim that is a multiple of 8 and <= 256 (got {q.shape[-1]})")
    out, lse, _, _ = fa._wrapped_flash_attn_forward(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
        0.0, scale, causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, return_softmax=False,
    )
    return out.transpose(1, 2), lse


def flash_attn_backward(dout, q, k, v, out, lse, *, causal: bool, mask=None, scale: float):
    fa = _flash_attn_interface()
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    fa._wrapped_flash_attn_backward(
        dout.transpose(1, 2).contiguous(), qt, kt, vt, out.transpose(1, 2).contiguous(), lse.contiguous(),  # float32 for 16-bit q (module doc)
        dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False, None,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


KERNELS: dict[str, Kernel] = {
    "reference": Kernel("reference", reference_forward, reference_backward, supports_mask=True),
    "cpu-flash": Kernel("cpu-flash", cpu_flash_forward, cpu_flash_backward, supports_mask=True),
    # cpu-flash taking no masks: packed blocks split per document exactly as on CUDA, so that path runs on CPU
    "cpu-flash-split": Kernel("cpu-flash-split", cpu_flash_forward, cpu_flash_backward, supports_mask=False),
    "cuda-flash": Kernel("cuda-flash", cuda_flash_forward, cuda_flash_backward, supports_mask=False),
    "cuda-cudnn": Kernel("cuda-cudnn", cuda_cudnn_forward, cuda_cudnn_backward, supports_mask=False),
    "flash-attn": Kernel("flash-attn", flash_attn_forward, flash_attn_backward, supports_mask=False),
}


def select_kernel(name: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel called `name`, or for "auto" the fastest correct one for device and dtype."""
    sixteen = dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        if device.type == "cuda":
            name = "cuda-cudnn" if sixteen and torch.backends.cudnn.is_available() else ("cuda-flash" if sixteen else "reference")
        else:
            name = "cpu-flash" if device.type == "cpu" else "reference"
    if name not in KERNELS:
        raise KernelError(f"unknown attention kernel {name!r}; choose from auto, {', '.join(KERNELS)}")
    if name == "flash-attn":
        _flash_attn_interface()  # installed and recent enough, or one clear error now
    if (name.startswith("cuda") or name == "flash-attn") and (device.type != "cuda" or not sixteen):
        raise KernelError(f"kernel {name!r} needs CUDA tensors in bfloat16/float16 (got {device.type}, {dtype}); use auto to pick one that runs here")
    if name.startswith("cpu-flash") and device.type != "cpu":
        raise KernelError(f"kernel {name!r} needs CPU tensors (got {device.type})")
    return KERNELS[name]
