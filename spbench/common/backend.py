"""Which process-group backend local ranks use: one rule for every command that spawns ranks."""
from __future__ import annotations

from .errors import UsageError
from .units import GiB

BACKENDS = ("auto", "gloo", "nccl", "gloo-cuda")
"""gloo: CPU tensors; nccl: one CUDA GPU per rank; gloo-cuda: gloo collectives on CUDA tensors, for ranks that
share GPUs (NCCL refuses two ranks on one GPU; ring P2P is staged through CPU)."""


def choose_backend(requested: str, nproc: int, device: str = "auto") -> str:
    """`requested` unless it is "auto"; auto is gloo when the ranks compute on CPU (device "cpu", or no CUDA),
    nccl when the machine has a GPU for every one of the `nproc` ranks, else gloo-cuda (ranks share GPUs)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is unknown; use one of {', '.join(BACKENDS)}")
    if requested in ("nccl", "gloo-cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--backend {requested} needs CUDA GPUs and torch sees none here; use --backend gloo or auto")
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


def cuda_device() -> dict | None:
    """{"name", "total_gib", "count"} of CUDA device 0, or None without a usable CUDA GPU. get_device_properties
    creates no CUDA context, so the calling process holds no GPU memory while its subprocesses run."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return None
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "total_gib": props.total_memory / GiB, "count": torch.cuda.device_count()}
    except Exception:  # noqa: BLE001 — a broken CUDA install is no GPU
        return None
