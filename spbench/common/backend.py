"""Which process-group backend local ranks use: one rule for every command that spawns ranks."""
from __future__ import annotations

BACKENDS = ("auto", "gloo", "nccl", "gloo-cuda")
"""gloo: CPU tensors; nccl: one CUDA GPU per rank; gloo-cuda: gloo collectives on CUDA tensors, for ranks that
share GPUs (NCCL refuses two ranks on one GPU; ring P2P is staged through CPU)."""


def choose_backend(requested: str, nproc: int, device: str = "auto") -> str:
    """`requested` unless it is "auto"; auto is gloo when the ranks compute on CPU (device "cpu", or no CUDA),
    nccl when the machine has a GPU for every one of the `nproc` ranks, else gloo-cuda (ranks share GPUs)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is unknown; use one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if device == "cpu":
        return "gloo"
    import torch  # here: choosing gloo for a CPU run needs no torch import

    if not torch.cuda.is_available():
        return "gloo"
    return "nccl" if torch.cuda.device_count() >= nproc else "gloo-cuda"


def rank_device(backend: str) -> str:
    """"cuda" when ranks of `backend` hold CUDA tensors, else "cpu"."""
    return "cpu" if backend == "gloo" else "cuda"
