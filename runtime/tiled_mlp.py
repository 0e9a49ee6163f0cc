"""Tiled MLP: the decoder layer's MLP over sequence chunks, one forward and one recompute per chunk and step.

`TiledMLP(mlp, n)` replaces `layer.mlp` in the user's model instance (transformers' classes are untouched).
x [..., s, h] → tensor_split along s into exactly n pieces (sizes differ by ≤ 1; empty pieces when s < n, so
every rank makes the same number of MLP calls: FAULTS.md F11) → mlp(piece) → cat → [..., s, h]. The MLP is
position-wise, so the result equals mlp(x) exactly.

With gradients on, the forward runs the pieces without saving anything but x, and the backward recomputes
each piece once, back-propagates its slice of the output gradient, and drops it before the next: only one
piece's [tokens × intermediate] activations exist at a time. The autograd graph is two nodes:

    x ─ _SaveInput (saves x; backward: recompute + backward of each piece) ─ _Pieces (forward: the pieces) ─ out

`_Pieces`' backward hands the output gradient through unchanged ([..., s, h] both), and `_SaveInput` applies
the MLP's Jacobian. Saving x *before* the pieces run is what keeps the MLP calls at 2 × n per step under
per-layer activation checkpointing: the layer's recompute (non-reentrant, early stop) ends as soon as the last
tensor the layer saved is saved again — here x, before any piece has run — so it never re-runs a piece. (Per-
piece `torch.utils.checkpoint`, which this replaces, saved each piece's input when that piece started: the
layer recompute ran n − 1 pieces first, 3n − 1 calls per step.) Nothing after the MLP in a Qwen2/Llama layer
saves a tensor (the residual add saves none); tests/test_memory.py counts the calls.

Without gradients (DPO's reference, evaluation) the pieces just run one after another: n calls.

The backward's recompute calls the MLP module, so DeepSpeed ZeRO-3's module hooks gather its partitioned
weights there as in any forward; the pieces' weight gradients accumulate in `.grad` (a nested backward per
piece, as reentrant checkpointing does), and `ds_grad_is_ready` (DeepSpeed's flag for tiled compute, read by
ZeRO 1–3) holds DeepSpeed's reduction back until the last piece. LoRA adapters inside the MLP (peft) are
ordinary parameters of it. Dropout draws are replayed: the RNG state of the forward is restored for the
recompute. State-dict keys stay those of the unwrapped model (`layers.0.mlp.gate_proj.weight`, not
`layers.0.mlp.mlp.gate_proj.weight`); `named_parameters()` does show the extra `.mlp`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


def run_pieces(mlp: nn.Module, x: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """mlp over `num_chunks` sequence pieces of x [..., s, h], one after another → [..., s, h]."""
    pieces = torch.tensor_split(x, num_chunks, dim=-2)  # num_chunks × [..., ~s/num_chunks, h]
    outs = [mlp(p) for p in pieces]
    return torch.cat(outs, dim=-2)  # [..., s, h]


@dataclass(frozen=True)
class RngState:
    """The CPU RNG state and, for a CUDA tensor, its device's: what the recompute replays (dropout masks)."""

    cpu: torch.Tensor
    device: torch.device
    device_state: torch.Tensor | None

    @classmethod
    def capture(cls, x: torch.Tensor) -> "RngState":
        cuda = x.device.type == "cuda"
        return cls(torch.get_rng_state(), x.device, torch.cuda.get_rng_state(x.device) if cuda else None)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the body from this state; the caller's RNG streams are left as they were."""
        devices = [self.device] if self.device_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.device_state is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


def _hold_deepspeed_reduction(params: list[nn.Parameter], hold: bool) -> None:
    """ZeRO: `hold` makes DeepSpeed's gradient hook leave a piece's partial gradient in `.grad` to accumulate;
    released for the last piece, when the summed gradient is complete. Plain torch ignores the attribute."""
    for p in params:
        p.ds_grad_is_ready = not hold


def backward_pieces(mlp: nn.Module, num_chunks: int, x: torch.Tensor, grad_out: torch.Tensor, rng: RngState,
                    need_x_grad: bool) -> torch.Tensor | None:
    """Recompute each piece of mlp(x) and back-propagate its slice of grad_out [..., s, h], one piece at a time.

    Parameter gradients accumulate into `.grad`; returns dL/dx [..., s, h] (None unless `need_x_grad`)."""
    params = [p for p in mlp.parameters() if p.requires_grad]
    xs = torch.tensor_split(x.detach(), num_chunks, dim=-2)  # the forward's pieces, in its order
    gs = torch.tensor_split(grad_out, num_chunks, dim=-2)
    grad_x = torch.empty_like(x) if need_x_grad else None
    gxs = torch.tensor_split(grad_x, num_chunks, dim=-2) if need_x_grad else [None] * num_chunks
    with rng.restored(), torch.enable_grad():
        for i, (xp, gp, gxp) in enumerate(zip(xs, gs, gxs)):
            _hold_deepspeed_reduction(params, hold=i + 1 < num_chunks)
            xp = xp.detach().requires_grad_(need_x_grad)  # [..., ~s/n, h], a leaf of this piece's graph
            out = mlp(xp)
            if out.requires_grad:
                torch.autograd.backward(out, gp)
            if need_x_grad:
                gxp.copy_(xp.grad)
    return grad_x


class _SaveInput(torch.autograd.Function):
    """Saves the MLP input; its backward is the tiled MLP's backward (see the module doc). `handle`: None, or an
    empty leaf that requires grad, so the output requires grad when x does not but MLP parameters do (LoRA
    adapters behind frozen embeddings). The parameters themselves are no inputs: a None gradient returned for
    them would still fire their post-accumulate hooks (DeepSpeed's reduction) once more."""

    @staticmethod
    def forward(ctx, x, tiled: "TiledMLP", rng: RngState, handle):
        ctx.tiled, ctx.rng = tiled, rng
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors  # under layer checkpointing: this unpack triggers the layer's recompute
        tiled = ctx.tiled
        grad_x = backward_pieces(tiled.mlp, tiled.num_chunks, x, grad_out, ctx.rng, ctx.needs_input_grad[0])
        return grad_x, None, None, None


class _Pieces(torch.autograd.Function):
    """The forward's pieces (no graph inside); backward: the output gradient, unchanged, to `_SaveInput`."""

    @staticmethod
    def forward(ctx, x, tiled: "TiledMLP"):
        x = x.detach()  # pieces of x itself would be views that report requires_grad but have no grad_fn
        return run_pieces(tiled.mlp, x, tiled.num_chunks)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None


class TiledMLP(nn.Module):
    """Runs the wrapped MLP over `num_chunks` sequence pieces: one forward and one recompute per piece and step
    (module doc). State-dict keys are the unwrapped model's."""

    def __init__(self, mlp: nn.Module, num_chunks: int) -> None:
        super().__init__()
        self.mlp = mlp
        self.num_chunks = num_chunks
        self.register_state_dict_post_hook(_drop_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    @property
    def num_chunks(self) -> int:
        return self._num_chunks

    @num_chunks.setter
    def num_chunks(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"TiledMLP num_chunks must be an int >= 1, got {n!r}")
        self._num_chunks = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return run_pieces(self.mlp, x, self.num_chunks)
        trainable = any(p.requires_grad for p in self.mlp.parameters())
        handle = torch.empty(0, device=x.device, requires_grad=True) if trainable and not x.requires_grad else None
        saved = _SaveInput.apply(x, self, RngState.capture(x), handle)  # x saved before any piece runs
        return _Pieces.apply(saved, self)  # [..., s, h]

    def extra_repr(self) -> str:
        return f"num_chunks={self.num_chunks}"


def _drop_inner_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: `<prefix>mlp.<rest>` → `<prefix><rest>` (the wrapped module's own keys)."""
    inner = prefix + "mlp."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_inner_prefix(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: `<prefix><rest>` → `<prefix>mlp.<rest>`, undoing `_drop_inner_prefix`."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "mlp.")]:
        state_dict[prefix + "mlp." + key[len(prefix):]] = state_dict.pop(key)


def _mlp_owners(model: nn.Module) -> list[nn.Module]:
    """Modules with an `mlp` child module (the decoder layers of Qwen2/Llama-style models)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "mlp", None), nn.Module) and not isinstance(m, TiledMLP)]


def apply_tiled_mlp(model: nn.Module, num_chunks: int) -> int:
    """Wrap every decoder layer's `mlp` in `TiledMLP(mlp, num_chunks)` (or update the count if wrapped).

    Module replacement in this model instance only; transformers' classes are untouched. Returns how many
    layers are tiled. `num_chunks` must come from the global shard length (`mlp_chunks_for`), not local data.
    """
    owners = _mlp_owners(model)
    if not owners:
        raise ValueError(f"{type(model).__name__} has no submodule with an `mlp` child; tiled MLP needs "
                         "Qwen2/Llama-style decoder layers (layer.mlp)")
    for owner in owners:
        if isinstance(owner.mlp, TiledMLP):
            owner.mlp.num_chunks = num_chunks
        else:
            owner.mlp = TiledMLP(owner.mlp, num_chunks)
    return len(owners)


def remove_tiled_mlp(model: nn.Module) -> int:
    """Undo `apply_tiled_mlp`: put the original MLP modules back. Returns how many were unwrapped."""
    n = 0
    for owner in _mlp_owners(model):
        if isinstance(owner.mlp, TiledMLP):
            owner.mlp = owner.mlp.mlp
            n += 1
    return n
