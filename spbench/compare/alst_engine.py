"""DeepSpeed ALST's own training path (`deepspeed.runtime.sequence_parallel.ulysses_sp`) under its own DeepSpeed
engine, on the harness's cases: nothing of the runtime's SP path runs.

Per rank, as ALST's tutorial and transformers' Trainer (`deepspeed_sp_compute_loss`) run it:

* `UlyssesSPAttentionHF.register_with_transformers` (ALST's groups, its attention under "sdpa");
* the harness's micro-batches, as an HF collator gives them (input_ids, position_ids, *unshifted* labels), in a
  torch DataLoader per rank wrapped by `UlyssesSPDataLoaderAdapter`: it gathers one batch from every SP rank,
  shifts the labels on the whole row (`shift_labels`) and hands each rank its contiguous shard, batch by batch;
* ALST's `TiledMLP` on every decoder MLP and `TiledFusedLogitsLoss` for the logits when the case's chunking
  splits anything (else the model's own loss over `shift_labels`);
* the loss of the docs: each rank's mean over its shard, weighted by its token count through the differentiable
  `torch.distributed.nn.functional.all_gather` over the SP group, over the SP group's token count;
* `deepspeed.initialize(..., mpu=ALST's groups)` with the harness's AdamW and schedule, the case's ZeRO stage (ZeRO 1
  when the case has none: stage 0 refuses float64 gradients), `engine.backward` / `engine.step` per micro-batch
  (gradient accumulation = ga).

Data feeding: the micro-batches of DP replica d (ALST's SP groups are consecutive ranks) form one stream, step by
step; batch j of the stream is rank j % SP's batch j // SP, so the adapter yields the stream in order. Every rank's
loader gets as many batches (the stream is topped up by repetition, as DistributedSampler does; never consumed).
Padding: `max_length` pads every row to the data's longest row rounded up to SP (ALST's fixed `seq_length`);
`longest` pads each micro-batch to its own longest row only (transformers' default collator, variable lengths).
Reported per step: the loss ALST back-propagates (mean over micro-batches and DP replicas), the grad norm the
engine clips (ZeRO cases: `get_global_grad_norm`, float32 as the case's ZeRO tolerance expects; the others: the norm
of the reduced gradients in the parameters' dtype), step-0 gradients, ALST's all-to-all bytes (comms logger).
"""
from __future__ import annotations

import functools
import math
import time

import torch
import torch.distributed as dist

from runtime.config import DTYPES, TrainConfig, from_dict
from runtime.data import longest_row
from runtime.dsconfig import read_deepspeed_json, resolve_deepspeed
from runtime.losses import IGNORE
from runtime.memory import resolve_mlp_chunks, shard_tokens
from runtime.models import build_model
from runtime.optim import build_optimizer
from runtime.records import build_schedule, load_tokenizer

from .adapters import Implementation
from .alst_data import hf_batch, rank_batches

PADDINGS = ("max_length", "longest")


def _refuses(case) -> str | None:
    if case.method != "ulysses":
        return f"ALST (deepspeed ulysses_sp) implements Ulysses only, not {case.method}"
    if case.stage == "dpo":
        return ("ALST ships no preference loss: its training path (UlyssesSPDataLoaderAdapter, causal-LM loss over "
                "shift_labels) is SFT only")
    if case.config.get("eval_strategy", "no") != "no":
        return "adapter deepspeed-alst: ALST's evaluation is not wired into this adapter (training steps only)"
    return None


def engine_config(cfg: TrainConfig, dp: int, hidden: int) -> dict:
    """The DeepSpeed config: the case's file (its ZeRO stage) or ZeRO 0, with the trainer's batch sizes and
    clipping; DeepSpeed counts the batch over the DP replicas (world / SP) when an SP mpu is given."""
    ds = read_deepspeed_json(cfg.deepspeed) if cfg.deepspeed else {"zero_optimization": {"stage": 1}}
    return resolve_deepspeed(ds, micro_batch=cfg.per_device_train_batch_size, grad_accum=cfg.gradient_accumulation_steps,
                             world=dp, max_grad_norm=cfg.max_grad_norm, bf16=cfg.dtype == "bfloat16", hidden=hidden)


def use_alst_tiled_mlp(model: torch.nn.Module, chunks: int) -> None:
    """Every decoder layer's MLP (this model instance) runs through ALST's TiledMLP in `chunks` sequence pieces."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    for layer in [m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]:
        mlp = layer.mlp
        mlp.forward = functools.partial(lambda m, x: TiledMLP.apply(type(m).forward, m, x, chunks,
                                                                    list(m.parameters())), mlp)


def shard_loss(engine, model, batch: dict, loss_chunk: int | None) -> torch.Tensor:
    """This rank's mean loss over its shard: the model's own loss over shift_labels, or ALST's
    TiledFusedLogitsLoss (sum over `loss_chunk`-token pieces, over the shard's token count) when that splits."""
    labels = batch["shift_labels"]  # [rows, L/sp]
    pieces = math.ceil(labels.numel() / loss_chunk) if loss_chunk else 1
    if pieces <= 1:
        logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        return model.loss_function(logits=logits, labels=None, shift_labels=labels, vocab_size=model.config.vocab_size)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    hidden = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    head = model.get_output_embeddings()

    def loss_fn(head, x, y):  # x [piece, h], y [piece]: ALST flattens rows × tokens before it cuts pieces
        return torch.nn.functional.cross_entropy(head(x), y, ignore_index=IGNORE, reduction="sum")
    total = TiledFusedLogitsLoss.apply(loss_fn, head, hidden, labels, None, pieces, [head.weight], "sum")
    return total / max(int((labels != IGNORE).sum()), 1)


def sp_group_loss(loss: torch.Tensor, labels: torch.Tensor, group, sp: int) -> torch.Tensor:
    """The docs' SP loss: Σ_r loss_r · tokens_r / Σ_r tokens_r over the SP group (ranks without tokens left out),
    gathered with the differentiable all_gather."""
    import torch.distributed.nn.functional as dfn

    losses = dfn.all_gather(loss, group=group)
    good = (labels != IGNORE).view(-1).sum()
    goods = dfn.all_gather(good, group=group)
    total = sum(losses[r] * goods[r] for r in range(sp) if goods[r] > 0)
    return total / max(sum(goods), 1)


def _alst_bytes() -> float:
    """Bytes ALST's all-to-alls moved so far (DeepSpeed's comms logger: msg size × count), then reset."""
    import deepspeed.comm as dcomm

    raw = dcomm.comms_logger.get_raw_data()
    dcomm.comms_logger.comms_dict = {}
    return float(sum(size * rec[0] for name, sizes in raw.items() if "all_to_all" in name for size, rec in sizes.items()))


def train_with_alst_engine(info, cfg_values: dict, capture_grads: bool = False, padding: str = "max_length",
                           top_up: bool = True) -> dict | None:
    """Rank job: the case trained by ALST's data-loader adapter, attention, tiled compute and loss under
    DeepSpeed's engine; rank 0 returns what `train_on_rank` returns (metrics, grads, grad_step, attention).

    `top_up=False` gives the SP ranks' loaders the stream as it comes (unequal lengths when the step count × ga is
    not a multiple of SP), and a rank whose loader runs out stops training, as a `for batch in loader` loop does."""
    import deepspeed
    import deepspeed.comm as dcomm
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r} unknown; use one of {', '.join(PADDINGS)}")
    cfg = from_dict(cfg_values)
    sp = cfg.sequence_parallel_size
    dp = info.world // sp
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    model, peft, names = _alst_model(cfg, info)
    schedule = build_schedule(cfg, dp, tokenizer, model.config.vocab_size)
    steps = schedule.steps(cfg.max_steps, cfg.num_train_epochs)
    fixed = math.ceil(longest_row(schedule.units) / sp) * sp
    chunks = resolve_mlp_chunks(cfg.memory_features, shard_tokens(fixed, sp, cfg.rows_per_micro_batch),
                                model.config.hidden_size)
    if chunks is not None:
        names = {n: n.replace(".mlp.", ".mlp.mlp.") for n in names}
        if chunks > 1:
            use_alst_tiled_mlp(model, chunks)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=sp,
        micro_batch_size=cfg.rows_per_micro_batch, seq_length=fixed if padding == "max_length" else None,
        seq_length_is_variable=padding == "longest")
    engine = None
    try:
        sp_group, sp_rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
        stream = [mb for s in range(steps) for mb in schedule.micro_batches(s, info.rank // sp, tokenizer.pad_id)]
        items = [hf_batch(mb, fixed if padding == "max_length" else mb.seq_len)
                 for mb in rank_batches(stream, sp, sp_rank, top_up)]
        loader = UlyssesSPDataLoaderAdapter(torch.utils.data.DataLoader(items, batch_size=None), sp_rank=sp_rank,
                                            sp_group=sp_group, sp_world_size=sp, device=info.device)
        optimizer, scheduler = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], steps)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
                                               config=engine_config(cfg, dp, model.config.hidden_size))
        dcomm.configure(enabled=True, prof_ops=["all_to_all_single"])
        grad_step = 1 if peft is not None and steps > 1 else 0
        capture = grad_step if capture_grads else None
        history, grads = _alst_steps(engine, scheduler, model, iter(loader), cfg, info, schedule, steps, sp_group,
                                     names, capture)
        alst_registered = ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
    finally:
        _release_alst(mpu, engine, sdpa_attention_forward)
    if info.rank != 0:
        return None
    return {"metrics": history, "grads": grads, "grad_step": grad_step, "eval": [],
            "attention": model.config._attn_implementation, "sp_attention": "sdpa" if alst_registered else None}


def _alst_model(cfg: TrainConfig, info):
    """(the case's model on this rank in train mode, with its LoRA and gradient checkpointing; the peft wrapper or
    None; {parameter name: the harness's name}: identity until TiledMLP renames them)."""
    model = build_model(cfg.model_name_or_path, DTYPES[cfg.dtype], "sdpa", seed=cfg.seed).to(info.device)
    peft = None
    if cfg.finetuning_type == "lora":
        from runtime.lora import apply_lora
        peft = apply_lora(model, cfg)
    names = {n: n for n, _ in model.named_parameters()}
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft is not None:
            model.enable_input_require_grads()
    model.train()
    return model, peft, names


def _alst_steps(engine, scheduler, model, batches, cfg: TrainConfig, info, schedule, steps: int, sp_group,
                names: dict, capture: int | None) -> tuple[list[dict], dict | None]:
    """Train `steps` steps from the loader adapter's iterator `batches` (ga micro-batches each); returns (per-step
    metrics, the reduced gradients of step `capture` or None). A rank whose loader runs out stops there."""
    sp, ga = cfg.sequence_parallel_size, cfg.gradient_accumulation_steps
    history, grads, raw = [], None, None
    for step in range(steps):
        t0, lr, loss_sum, held, padded = time.perf_counter(), scheduler.get_last_lr()[0], 0.0, 0, 0
        for m in range(ga):
            raw = next(batches, None)
            if raw is None:  # this rank's loader ran out (top_up=False): its training loop ends here
                break
            # ALST hands out column slices of the gathered rows (views); on a GPU the host→device copy makes
            # them contiguous, on CPU `.to` does not, and transformers' loss `.view(-1)` rejects 2+ rows
            batch = {k: v.to(info.device).contiguous() for k, v in raw.items() if torch.is_tensor(v)}
            held += batch["input_ids"].numel()
            padded += batch["input_ids"].numel() * sp
            loss = sp_group_loss(shard_loss(engine, model, batch, cfg.tiled_loss_chunk), batch["shift_labels"],
                                 sp_group, sp)
            loss_sum += float(loss.detach())
            engine.backward(loss)
            if m == ga - 1:  # the boundary: gradients reduced, not yet clipped or stepped
                if step == capture:
                    grads = _full_grads(engine, model, names)
                norm = None if cfg.deepspeed else _norm(_full_grads(engine, model, names).values())
            engine.step()
        if raw is None:
            break
        norm = engine.get_global_grad_norm() if norm is None else norm
        mean = torch.tensor([loss_sum / ga], dtype=torch.float64)
        dist.all_reduce(mean)  # every SP rank holds the same value: the mean over DP replicas is sum / world
        history.append({"step": step, "loss": float(mean) / info.world, "grad_norm": float(norm), "lr": lr,
                        "tokens": schedule.step_tokens(step), "rank_tokens": held, "seq_tokens": padded,
                        "sp_comm_bytes": _alst_bytes() * (sp - 1) / sp, "step_time_s": time.perf_counter() - t0})
    return history, grads


def _release_alst(mpu, engine, sdpa_forward) -> None:
    """Undo what ALST leaves in this process, so the pool's next job can register again."""
    import deepspeed.comm as dcomm
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    dcomm.configure(enabled=False)
    dcomm.comms_logger.comms_dict = {}
    if engine is not None:
        engine.destroy()
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_forward  # ALST registered itself over transformers' sdpa
    # ALST keeps its groups in module globals with no public teardown short of destroying WORLD: release them
    for group in {mpu.get_sequence_parallel_group(), mpu.get_sequence_data_parallel_group()}:
        dcomm.destroy_process_group(group)
    parallel_state_sp._release_sequence_parallel_groups()
    groups.mpu = None


def train_with_alst_engine_dynamic_pad(info, cfg_values: dict, capture_grads: bool = False) -> dict | None:
    """Rank job: `train_with_alst_engine` with each micro-batch padded to its own longest row only."""
    return train_with_alst_engine(info, cfg_values, capture_grads, padding="longest")


def _full_grads(engine, model, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The reduced gradients of the trainable parameters (DeepSpeed's `safe_get_full_grad`, collective), under
    the harness's parameter names."""
    from deepspeed.utils import safe_get_full_grad

    return {names[n]: safe_get_full_grad(p).detach().to("cpu", torch.float64).clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


ALST_ENGINE = Implementation(
    name="deepspeed-alst", packages=("deepspeed", "transformers", "torch"), sp_job=train_with_alst_engine,
    refuses=_refuses,
    features={"strategies": ["ulysses"], "gqa": "kv heads replicated up to SP (UlyssesSPAttentionHF)",
              "packing": "position_ids only (the mask is dropped: SDPA attends across documents)",
              "data": "UlyssesSPDataLoaderAdapter (labels shifted before sharding)",
              "padding": "max_length (the data's longest row rounded up to SP)", "loss": "docs' SP-weighted mean",
              "tiled": ["TiledMLP", "TiledFusedLogitsLoss"], "dpo": "none", "zero": [0, 1, 2, 3]})

ALST_ENGINE_DYNAMIC_PAD = Implementation(
    name="deepspeed-alst-dynamic-pad", packages=ALST_ENGINE.packages,
    sp_job=train_with_alst_engine_dynamic_pad, refuses=_refuses,
    features={**ALST_ENGINE.features, "padding": "longest row of each micro-batch (transformers' default collator)"})
