"""Traced peaks with SP (fake tensors, fake process group; issue 10 §1): every SP rank of a strategy peaks alike, so
rank 0 stands for all; checkpoint offload's CPU copies are host memory, not device memory; a ZeRO setup's traced
peak is the trace's state-free peak plus the model's static terms; `spbench maxlen --trace` searches on traces."""
from __future__ import annotations

import json

import pytest
import torch

from runtime.memory import MemoryFeatures
from spbench.cli import main
from spbench.common.units import GiB
from spbench.memory.model import peak_memory
from spbench.memory.setup import Setup
from spbench.memory.step import StepSpec
from spbench.memory.trace import traced_peak
from spbench.memory.traced import ZERO_STATIC_TERMS, NotTraceable, traced_setup_peak

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(method: str, sp: int, length: int = 256, **features) -> StepSpec:
    return StepSpec("tiny", "sft", length, MemoryFeatures(tiled_loss_chunk=32, tiled_mlp_chunks=4, **features),
                    dtype="bfloat16", device="cpu", nproc=sp, sp=sp, method=method)


@pytest.mark.parametrize("method,sp", [("zigzag", 4), ("hybrid", 4), ("ulysses", 2)])
def test_every_sp_rank_peaks_alike(method, sp):
    """Full-length rows: every rank holds the same shapes, so the traced peaks are equal byte for byte."""
    peaks = [traced_peak(_spec(method, sp), rank) for rank in range(sp)]
    assert len({p["peak_bytes"] for p in peaks}) == 1, [p["peak_bytes"] for p in peaks]
    assert len({p["state_free_peak_gib"] for p in peaks}) == 1
    assert all(p["tokens"] == 256 // sp for p in peaks)


@pytest.mark.parametrize("method,sp", [("ring", 4), ("zigzag", 4)])
def test_traced_setup_peak_is_the_peak_over_every_sp_rank(method, sp):
    """Blockwise attention's ranks differ by their place in the ring (contiguous ring: rank 0 the least; zigzag: the
    last rank the least): the peak traced over `peak_ranks` is the largest over all ranks."""
    setup = Setup("tiny", "sft", gpus=sp, sp=sp, sp_method=method,
                  features=MemoryFeatures(tiled_loss_chunk=32, tiled_mlp_chunks=4, checkpoint_offload=True))
    every = [traced_setup_peak(setup, 8192, rank=r)["traced_gib"] for r in range(sp)]
    assert len(set(every)) > 1, every  # the ranks differ, or this case checks nothing
    top = traced_setup_peak(setup, 8192)
    assert top["traced_gib"] == max(every) and every[top["rank"]] == max(every)


def test_checkpoint_offload_moves_the_checkpoints_to_host_memory():
    """Offloaded, the layers' checkpointed inputs (layers × n × h × 2 B) are host memory: the host peak holds all
    of them and the device peak drops by exactly one: both inputs leave, the recomputed layer's comes back (measured:
drop 1.0 × n·h·2 B; 2.0 when the unpack hands back the host tensor itself, which a GPU cannot)."""
    plain, off = (traced_peak(_spec("zigzag", 4, length=4096, checkpoint_offload=o)) for o in (False, True))
    one = 1024 * 64 * 2  # n × h × bf16
    assert plain["host_peak_gib"] == 0
    assert off["host_peak_gib"] * GiB >= 2 * one  # both layers' inputs saved on the host at once
    # both layers' inputs leave the device; the one being recomputed is back (a fresh device copy, as on a GPU)
    assert (plain["state_free_peak_gib"] - off["state_free_peak_gib"]) * GiB == pytest.approx(one)


def test_zero3_traced_peak_is_the_state_free_trace_plus_the_models_static_terms():
    setup = Setup("tiny", "sft", gpus=4, gpu_mem_gib=80, sp=4, zero=3, offload=frozenset({"optimizer", "param"}),
                  features=MemoryFeatures(tiled_loss_chunk=32, tiled_mlp_chunks=4), sp_method="zigzag")
    r = traced_setup_peak(setup, 4096)
    terms = peak_memory(setup, 4096)["terms"]
    assert r["from_model"] == [*ZERO_STATIC_TERMS, "step phase", "cuda_kernel"]
    static, kernel = sum(terms[t] for t in ZERO_STATIC_TERMS), terms["cuda_kernel"]
    free = max(r["trace"]["state_free_peak_gib"], r["trace"]["attention_state_free_peak_gib"] + kernel)
    assert kernel > 0 and r["traced_gib"] == pytest.approx(max(static + free, peak_memory(setup, 4096)["phases"]["step"]))
    replica = traced_setup_peak(Setup("tiny", "sft", gpus=4, sp=4, features=setup.features, sp_method="zigzag"), 4096)
    assert replica["from_model"] == ["workspace", "cuda_kernel"]
    trace = replica["trace"]
    assert trace["attention_peak_gib"] <= trace["peak_gib"]
    assert replica["traced_gib"] == pytest.approx(max(trace["peak_gib"], trace["attention_peak_gib"] + kernel) + terms["workspace"])
    cpu = traced_setup_peak(Setup("tiny", "sft", gpus=4, sp=4, features=setup.features, sp_method="zigzag",
                                  attention_kernel="cpu-flash"), 4096)  # the trace's own kernel: nothing added
    assert cpu["from_model"] == ["workspace"]
    assert cpu["traced_gib"] == pytest.approx(cpu["trace"]["peak_gib"] + terms["workspace"])
    # LoRA: fake base, real adapters (runtime/lora.py): the frozen base holds no gradients or AdamW states
    lora, full = (traced_setup_peak(Setup("tiny", "sft", finetuning=f), 256)["trace"] for f in ("lora", "full"))
    assert 0 < lora["peak_gib"] < full["peak_gib"] and lora["state_free_peak_gib"] > 0
    with pytest.raises(NotTraceable, match="lora_target"):
        traced_setup_peak(Setup("tiny", "sft", finetuning="lora", lora_target="q_proj"), 256)


def test_maxlen_trace_search_brackets_the_traced_limit(tmp_path, capsys):
    """A 0.8 GiB GPU (0.285 GiB usable, 0.25 of it the model's workspace) and tiny at SP 2 untiled (a step's ops
    do not grow with length): the search ends where one more step of the resolution no longer fits, on traced
    peaks; the row says which terms came from the model."""
    out = tmp_path / "m"
    assert main(["maxlen", "--model", "tiny", "--gpus", "2", "--sp", "2", "--zero", "0", "--offload", "none",
                 "--gpu-mem", "0.8", "--no-tiled-loss", "--no-tiled-mlp", "--trace", "search", "--resolution", "1024", "--out", str(out)]) == 0
    row = json.loads((out / "maxlen.json").read_text())["rows"][0]
    assert row["source"] == "traced" and row["from_model"] == ["workspace", "cuda_kernel"] and row["max_len"] > 0
    probes = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    by_len = {p["length"]: p["status"] for p in probes}
    assert by_len[row["max_len"]] == "ok" and by_len[row["failed_above"]] == "exceeds"
    assert row["failed_above"] - row["max_len"] == 1024
    assert "traced" in capsys.readouterr().out


def test_trace_refuses_estimate(tmp_path, capsys):
    assert main(["maxlen", "--model", "tiny", "--trace", "check", "--estimate", "--out", str(tmp_path / "x")]) == 2
    assert "--trace runs on the CPU" in capsys.readouterr().err


def test_trace_check_resumes_rows_already_traced(tmp_path, monkeypatch, capsys):
    """`maxlen --trace check` logs each traced row at once; --resume takes it from probes.jsonl instead of tracing
    again (a 0.5B row traces for 10-20 min on the CI box: a stopped sweep must not start over)."""
    import spbench.memory.traced as traced

    argv = ["maxlen", "--model", "tiny", "--gpus", "2", "--sp", "2", "--zero", "0", "--offload", "none", "--gpu-mem",
            "0.8", "--no-tiled-loss", "--no-tiled-mlp", "--trace", "check", "--out", str(tmp_path)]
    assert main(argv) == 0
    first = json.loads((tmp_path / "maxlen.json").read_text())["rows"][0]
    assert first["traced_gib"] > 0
    assert f"SP rank 0 traced at {first['max_len']:,}: " in capsys.readouterr().err  # progress as each rank ends

    def must_not_trace(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(traced, "traced_setup_peak", must_not_trace)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((tmp_path / "maxlen.json").read_text())["rows"][0] == first
    assert "traced before (--resume)" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="traced again"):  # without --resume it traces
        main(argv)


def _ring_peak(zigzag: bool, backward: bool, heads=4, kv_heads=2, dim=8, tokens=64, sp=4) -> int:
    """Peak live bytes of ring_forward or ring_backward on SP rank 0 (fake tensors and process group), inputs
    included."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from runtime.attention.blockattn import SeqMeta
    from runtime.attention.kernels import KERNELS
    from runtime.attention.ring import ring_backward, ring_forward
    from runtime.layout import ShardPlan
    from spbench.memory.step import fake_rank

    meta = SeqMeta.build(ShardPlan.for_length(tokens * sp, sp, 1, zigzag), tokens * sp, True)
    kernel = KERNELS["cpu-flash"]
    with fake_rank(0, sp), FakeTensorMode(allow_non_fake_inputs=True):
        q, dout = (torch.empty(1, heads, tokens, dim, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.empty(1, kv_heads, tokens, dim, dtype=torch.bfloat16) for _ in range(2))
        tracker = MemTracker()
        if backward:
            out, lse = ring_forward(q, k, v, None, meta, kernel, 0.1, None)
            tracker.track_external(q, k, v, dout, out, lse)
        else:
            tracker.track_external(q, k, v)
        with tracker:
            if backward:
                ring_backward(dout, q, k, v, out, lse, None, meta, kernel, 0.1, None)
            else:
                ring_forward(q, k, v, None, meta, kernel, 0.1, None)
    return max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


def test_zigzag_ring_backward_holds_no_block_sized_copy():
    """A zigzag block is two kernel calls per step (its two halves); their gradients go straight into the ring's
    accumulators. Its peak exceeds the contiguous ring's (one call per block) by exactly the half-size contiguous
    copies of dout, q, out and lse, less the smaller dq of a half call: (n/2)·H·(3·2d − 2d + 4) bytes (K/V's half
    copies cancel against their halved gradients). Measured, tiny shapes: 4608 bytes. Mutants seen failing:
    a block-sized float32 dq/dk/dv per step beside the accumulators (+16896 B; +8.4·H·d per token at 7B shapes),
    a piece's gradients kept alive into the next piece's call (+8704 B)."""
    heads, kv_heads, dim, tokens = 4, 2, 8, 64
    zig, ring = (_ring_peak(z, True, heads, kv_heads, dim, tokens) for z in (True, False))
    assert zig - ring == tokens // 2 * heads * (3 * 2 * dim - 2 * dim + 4), (zig, ring)


@pytest.mark.parametrize("zigzag", [True, False])
def test_ring_forward_merges_in_place(zigzag):
    """The ring forward merges each kernel call into its float32 accumulator in place: its peak over q, k, v and
    the K/V blocks in flight is the accumulators (4·H·d + 4·H per token), the bf16 result (2·H·d) and the call's
    output (2·H·d) — no float32 copy of out (the functional merge held four more). Measured over inputs and the K/V
    in flight, tiny shapes: zigzag 10,880 B, ring 16,640 B, budget 17,408 B. Mutant seen failing: the functional
    merge in the ring forward (zigzag 41,984 B, ring 37,888 B)."""
    heads, kv_heads, dim, tokens = 4, 2, 8, 64
    peak = _ring_peak(zigzag, False, heads, kv_heads, dim, tokens)
    inputs = 2 * tokens * (heads + 2 * kv_heads) * dim  # q, k, v in bf16
    in_flight = 2 * 2 * tokens * kv_heads * dim  # the next K/V block
    assert peak - inputs - in_flight <= tokens * heads * (4 * dim + 4 + 2 * dim + 2 * dim), peak


def _ring_backward_clones(transposed: bool, heads=4, kv_heads=2, dim=8, tokens=64, sp=4) -> int:
    """aten.clone calls (what .contiguous() copies with) in the backward of ring attention on SP rank 0, for q/k/v
    given contiguous or as the transposed views RoPE hands over ([b, s, H, d] memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from runtime.attention.blockattn import SeqMeta
    from runtime.attention.kernels import KERNELS
    from runtime.attention.ring import ring_attention
    from runtime.layout import ShardPlan
    from spbench.memory.step import fake_rank

    class Clones(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Clones.count += func is torch.ops.aten.clone.default
            return func(*args, **(kwargs or {}))

    def make(h):
        x = torch.empty(1, tokens, h, dim, dtype=torch.bfloat16).transpose(1, 2) if transposed else \
            torch.empty(1, h, tokens, dim, dtype=torch.bfloat16)
        return x.requires_grad_()

    meta = SeqMeta.build(ShardPlan.for_length(tokens * sp, sp, 1, False), tokens * sp, True)
    with fake_rank(0, sp), FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = make(heads), make(kv_heads), make(kv_heads)
        out, _ = ring_attention(q, k, v, None, meta, KERNELS["cpu-flash"], 0.1)
        with Clones():
            out.backward(torch.empty_like(out))
    return Clones.count


def test_ring_saves_q_k_v_contiguous():
    """RoPE hands attention transposed views; the ring saves them contiguous once, so its backward copies no more
    than for contiguous inputs (else each of the P steps' kernel calls copies q, k, v: 2·H·d + 4·Hk·d bytes per token
    at the backward's peak, traced at 7B). Mutant seen failing: the forward's .contiguous() removed (3 clones vs 0:
    rank 0 has one visible block, its diagonal)."""
    assert _ring_backward_clones(True) == _ring_backward_clones(False)
