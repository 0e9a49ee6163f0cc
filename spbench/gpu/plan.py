"""What `spbench gpu-check` runs: the ordered list of commands (steps), each with its timeout and its plan facts.

  1. attention  `spbench check-attention` for zigzag, ulysses, hybrid on 2 gloo-cuda ranks, bfloat16,
                seq 4096, 28 heads, 4 kv heads, head dim 128: passed, max errors, the kernel chosen
  2. parity     `spbench parity` ad-hoc case sft zigzag sp 2, bfloat16, gloo-cuda, 3 steps: passed, max errors
  3. probes     `python -m spbench.memory.probe`, 2 steps each (the second is timed), plain (transformers' SDPA, no tiled
                loss, no tiled MLP) vs ours (the runtime's attention with kernel auto, default memory features):
                qwen2.5-0.5b SFT at 32k, qwen2.5-7b SFT at 16k and 32k. Each records peak GiB, tokens/s and the
                memory model's prediction for the same setup; the pairs give ours / plain tokens/s at 32k and
                the activation slope (MB per token between 16k and 32k)
  4. dist       `python -m spbench.memory.distprobe`: the trainer itself (ours) on 2 ranks emulated on the GPU
                (gloo-cuda, each capped at half its memory), qwen2.5-0.5b SFT, Ulysses SP 2 at 64k: the path
                `spbench maxlen` measures multi-GPU setups with; per-rank peak against the memory model
  5. maxlen     one probe of qwen2.5-0.5b (ours) at a fraction of the memory model's predicted maximum length
                on one GPU of the given memory: success or OOM
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from runtime.memory import MemoryFeatures

from ..common.errors import UsageError
from ..memory import model as memmodel
from ..memory.step import StepSpec, step_flags

ATTN_METHODS = ("zigzag", "ulysses", "hybrid")
ATTN_SHAPE = {"seq": 4096, "heads": 28, "kv_heads": 4, "head_dim": 128}  # Qwen2.5-7B heads; the float64 oracle is dense on the host


@dataclass(frozen=True)
class Variant:
    """A probe setup: memory features and attention (TrainConfig.attention: sdpa = transformers', runtime = ours)."""

    features: MemoryFeatures
    attention: str


VARIANTS = {"plain": Variant(MemoryFeatures.plain(), "sdpa"), "ours": Variant(MemoryFeatures(), "runtime")}
PROBES = (("qwen2.5-0.5b", 32768), ("qwen2.5-7b", 16384), ("qwen2.5-7b", 32768))
"""(model, tokens) probed in every variant: 32k is where issue 5 sets the throughput goal; two 7B lengths give
the per-token slope of the activation memory without subtracting any static estimate."""
PROBE_STEPS = 2
MAXLEN_MODEL = "qwen2.5-0.5b"
RESOLUTION = 1024
DIST = {"model": "qwen2.5-0.5b", "length": 65536, "nproc": 2, "method": "ulysses"}
KINDS = ("attention", "parity", "probes", "dist", "maxlen")
TIMEOUTS = {"attention": 120.0, "parity": 150.0, "probes": 180.0, "dist": 240.0, "maxlen": 540.0}
"""Seconds per step before it is killed (its whole process group); each is also clipped to the budget left."""


@dataclass
class Step:
    """One planned command: `args` follow the Python interpreter; `info` is copied into the step's record."""

    name: str
    kind: str
    args: tuple[str, ...]
    timeout_s: float
    info: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        return "python " + shlex.join(self.args)


def probe_name(model: str, variant: str, length: int) -> str:
    return f"probe-{model}-{variant}-{length // 1024}k"


def probe_setup(model: str, variant: str, gpu_mem_gib: float) -> memmodel.Setup:
    """The memory model's description of a probe: one GPU, no DeepSpeed, SFT, `variant`'s features."""
    return memmodel.Setup(model, "sft", gpus=1, gpu_mem_gib=gpu_mem_gib, sp=1, zero=0,
                          features=VARIANTS[variant].features)


def probe_args(model: str, length: int, variant: Variant, cap_gib: float | None, steps: int = 1) -> tuple[str, ...]:
    """`spbench.memory.probe` arguments for `steps` SFT steps; features and attention are spelled out so probe and
    model agree. `cap_gib` caps the probe's GPU memory (--gpu-mem given); None: the whole device."""
    cap = () if cap_gib is None else ("--gpu-mem-gib", f"{cap_gib:g}")
    spec = StepSpec(model, "sft", length, variant.features, variant.attention, steps)
    return ("-m", "spbench.memory.probe", *step_flags(spec), *cap)


def dist_step(gpu_mem_gib: float, cap_gib: float | None) -> Step:
    """Step 4: DIST's ranks share the GPU, each capped at its share (of --gpu-mem when given)."""
    d, ours = DIST, VARIANTS["ours"]
    share = (cap_gib or gpu_mem_gib) / d["nproc"]
    f = ours.features
    spec = StepSpec(d["model"], "sft", d["length"], f, steps=PROBE_STEPS)
    args = ("-m", "spbench.memory.distprobe", *step_flags(spec),
            "--nproc", str(d["nproc"]), "--sp", str(d["nproc"]), "--method", d["method"], "--backend", "gloo-cuda",
            "--gpu-mem-gib", f"{share:g}", "--timeout", f"{TIMEOUTS['dist']:g}")
    setup = memmodel.Setup(d["model"], "sft", gpus=d["nproc"], gpu_mem_gib=share, sp=d["nproc"], zero=0,
                           features=f, sp_method=d["method"])
    info = {"model": d["model"], "variant": "ours", "stage": "sft", "length": d["length"], "nproc": d["nproc"],
            "sp": d["nproc"], "method": d["method"], "backend": "gloo-cuda", "rank_cap_gib": share,
            "steps": PROBE_STEPS, "features": f.to_json(), **_prediction(setup, d["length"])}
    return Step(f"dist-{d['model']}-sp{d['nproc']}-{d['length'] // 1024}k", "dist", args, TIMEOUTS["dist"], info)


def _prediction(setup: memmodel.Setup, length: int) -> dict:
    pred = memmodel.peak_memory(setup, length)
    return {"predicted_gib": pred["total_gib"], "predicted_phase": pred["phase"], "predicted_fits": pred["fits"]}


def build_plan(gpu_mem_gib: float, maxlen_fraction: float, parity_out: Path, kinds=KINDS,
               cap_gib: float | None = None) -> list[Step]:
    """The steps of one run, in order (only those of `kinds`); the memory model sees `gpu_mem_gib`, the probes
    are capped at `cap_gib` (None: no cap). Raises UsageError when the memory model predicts that not even
    RESOLUTION tokens of the maxlen model fit on `gpu_mem_gib`."""
    steps = []
    if "attention" in kinds:
        shape = ATTN_SHAPE
        for method in ATTN_METHODS:
            args = ("-m", "spbench", "check-attention", "--method", method, "--sp", "2", "--heads", str(shape["heads"]),
                    "--kv-heads", str(shape["kv_heads"]), "--seq", str(shape["seq"]), "--head-dim",
                    str(shape["head_dim"]), "--dtype", "bfloat16", "--backend", "gloo-cuda",
                    "--timeout", f"{TIMEOUTS['attention']:g}", "--json")
            steps.append(Step(f"attention-{method}", "attention", args, TIMEOUTS["attention"],
                              {"method": method, "sp": 2, "dtype": "bfloat16", **shape}))
    if "parity" in kinds:
        args = ("-m", "spbench", "parity", "--stage", "sft", "--method", "zigzag", "--sp", "2", "--dtype", "bfloat16",
                "--steps", "3", "--backend", "gloo-cuda", "--timeout", f"{TIMEOUTS['parity']:g}",
                "--out", str(parity_out), "--json")
        steps.append(Step("parity-sft-zigzag-sp2", "parity", args, TIMEOUTS["parity"],
                          {"stage": "sft", "method": "zigzag", "sp": 2, "dtype": "bfloat16", "steps": 3}))
    if "probes" in kinds:
        for model, length in PROBES:
            for name, variant in VARIANTS.items():
                info = {"model": model, "variant": name, "stage": "sft", "length": length,
                        "attention": variant.attention, "steps": PROBE_STEPS, "features": variant.features.to_json(),
                        **_prediction(probe_setup(model, name, gpu_mem_gib), length)}
                steps.append(Step(probe_name(model, name, length), "probes",
                                  probe_args(model, length, variant, cap_gib, PROBE_STEPS), TIMEOUTS["probes"], info))
    if "dist" in kinds:
        steps.append(dist_step(gpu_mem_gib, cap_gib))
    if "maxlen" in kinds:
        setup = probe_setup(MAXLEN_MODEL, "ours", gpu_mem_gib)
        predicted_max = memmodel.maxlen_for(setup, resolution=RESOLUTION)
        if predicted_max == 0:
            raise UsageError(f"the memory model predicts that {MAXLEN_MODEL} does not fit on {gpu_mem_gib:g} GiB "
                             f"at any length; give the GPU's memory with --gpu-mem (e.g. 80)")
        length = max(RESOLUTION, int(predicted_max * maxlen_fraction) // RESOLUTION * RESOLUTION)
        ours = VARIANTS["ours"]
        info = {"model": MAXLEN_MODEL, "variant": "ours", "stage": "sft", "gpu_mem_gib": gpu_mem_gib,
                "predicted_max_len": predicted_max, "maxlen_fraction": maxlen_fraction, "length": length,
                "attention": ours.attention, "features": ours.features.to_json(), **_prediction(setup, length)}
        steps.append(Step(f"maxlen-{MAXLEN_MODEL}", "maxlen", probe_args(MAXLEN_MODEL, length, ours, cap_gib),
                          TIMEOUTS["maxlen"], info))
    return steps
