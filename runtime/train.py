"""A small, exact training loop for SFT and DPO under sequence parallelism (plain torch or DeepSpeed).

Per optimizer step: every rank builds the step's micro-batches from the schedule (data.py),
takes its SP shard, runs forward/backward of its share of the *global* objective (losses.py),
then gradients are summed over every rank (SP shards hold partial gradients of the same
parameters; DP replicas hold gradients of different rows, already divided by the global
denominator), clipped on the reduced gradient, and the optimizer steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import checkpoint
from .attention import SPAttention, resolve_ulysses, shard_plan
from .attention.hf import SPBatch, register_sp_attention
from .attention.kernels import select_kernel
from .comm import CommCounter, all_reduce_, sum_shards
from .config import DTYPES, ConfigError, TrainConfig
from .data import LocalBatch, MicroBatch, StepSchedule, longest_row, shard_batch
from .evaluate import eval_due, evaluate
from .lora import adapters_disabled, apply_lora, check_lora, trainable_parameters
from .losses import IGNORE, preference_loss, sft_loss, token_logprobs
from .memory import OffloadStats, checkpoint_offload, prepare_model, shard_tokens
from .models import build_model, check_attention_reachable, check_weights, head_counts, model_config, placed
from .optim import build_optimizer, clip_gradients, deepspeed_json, init_deepspeed
from .records import build_eval_schedule, build_schedule, load_tokenizer
from .topology import ParallelContext, TopologyError, build_parallel_context, rank_grid, single_process_context

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def device_type(cfg: TrainConfig) -> str:
    """"cuda" or "cpu": where the ranks of this run compute."""
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"


def ulysses_for(cfg: TrainConfig) -> int:
    """The Ulysses degree `cfg` runs with, by the runtime's rule (TopologyError when the heads cannot split)."""
    heads, kv_heads = head_counts(model_config(cfg.model_name_or_path))
    return resolve_ulysses(cfg.sequence_parallel_mode, cfg.sequence_parallel_size, heads, kv_heads, cfg.ulysses_degree)


def preflight(cfg: TrainConfig, world: int) -> None:
    """Raise the input errors a run would hit (model, layout, kernel, data) before any rank starts, one line each."""
    check_weights(cfg.model_name_or_path)
    if cfg.uses_sp_attention:
        check_attention_reachable(model_config(cfg.model_name_or_path))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA GPU here; use device: auto or cpu")
    rank_grid(world, cfg.sequence_parallel_size, ulysses_for(cfg))
    select_kernel(cfg.attention_kernel, torch.device(device_type(cfg)), DTYPES[cfg.dtype])
    check_lora(cfg, model_config(cfg.model_name_or_path))
    if cfg.deepspeed:
        deepspeed_json(cfg, world, DTYPES[cfg.dtype], model_config(cfg.model_name_or_path).hidden_size)
    for build in (build_schedule, build_eval_schedule):
        build(cfg, world // cfg.sequence_parallel_size, load_tokenizer(cfg.model_name_or_path),
              model_config(cfg.model_name_or_path).vocab_size)


def context_for(cfg: TrainConfig) -> ParallelContext:
    """Build the process groups `cfg` needs (collective: every rank calls it)."""
    return build_parallel_context(cfg.sequence_parallel_size, ulysses_for(cfg))


class TokenLogProbs(torch.nn.Module):
    """A causal LM that returns log p(target) per token ([b, s]) instead of logits.

    It is the unit DeepSpeed wraps, so ZeRO-3's module hooks see one top-level forward per
    micro-batch (calling the decoder and lm_head separately left ZeRO-3 gradients wrong).
    Logits go through `token_logprobs` (tiled when `chunk_tokens` is set); with `offload`,
    the checkpointed hidden states of the decoder live in CPU memory (`last_offload` counts
    what the latest forward moved there).
    """

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int | None, offload: bool):
        super().__init__()
        self.lm, self.chunk_tokens, self.offload = lm, chunk_tokens, offload
        self.last_offload = OffloadStats()

    def forward(self, input_ids, position_ids, targets, **kwargs) -> torch.Tensor:
        offload = self.offload and torch.is_grad_enabled()
        with checkpoint_offload() if offload else contextlib.nullcontext(OffloadStats()) as stats:
            self.last_offload = stats
            hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state
        return token_logprobs(hidden, self.lm.get_output_embeddings(), targets, self.chunk_tokens)


@dataclass
class Shapes:
    heads: int
    kv_heads: int
    vocab: int


class Trainer:
    """Builds model, data and optimizer from a TrainConfig for this rank; `train()` runs it.

    `pc` is this rank's ParallelContext (None: single process). The harness drives the
    trainer in-process: `train(on_step=...)` returns the per-step metrics, and with
    `capture_grads=True` the reduced gradients of the trainable parameters at step `grad_step` are kept in
    `captured_grads` (step 0; LoRA: step 1, as its B starts at 0 and A's step-0 gradients are 0 on any layout).
    LoRA DPO takes its reference log-probs from the policy with adapters disabled; `separate_reference=True`
    builds a second, adapter-free model for them instead (the parity harness's independent SP-off path).
    `build`: how the policy (and reference) model is made from (name, dtype, attention, seed); runtime.models'
    build_model, or a memory trace's reduced-depth one (spbench/memory/traced.py).
    """

    def __init__(self, cfg: TrainConfig, pc: ParallelContext | None = None, schedule: StepSchedule | None = None,
                 separate_reference: bool = False, build: Callable[..., torch.nn.Module] = build_model):
        self.cfg = cfg
        self.pc = pc or single_process_context()
        sp = cfg.sequence_parallel_size
        mcfg = model_config(cfg.model_name_or_path)
        self.shapes = Shapes(*head_counts(mcfg), mcfg.vocab_size)
        self.ulysses = ulysses_for(cfg)
        grid = self.pc.grid
        if (grid.sp, grid.ulysses) != (sp, self.ulysses):
            raise TopologyError(f"process grid has sp={grid.sp}, ulysses={grid.ulysses} but the config needs "
                                f"sp={sp}, ulysses={self.ulysses}; build the context with those degrees")
        self.device = torch.device(device_type(cfg))
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES[cfg.dtype]
        # SP off and nothing packed: transformers' own SDPA attention is the independent reference.
        attn_impl = register_sp_attention() if cfg.uses_sp_attention else "sdpa"
        with torch.device(self.device):  # weights made where they live: no host copy of a 7B model per rank
            self.model = placed(build(cfg.model_name_or_path, self.dtype, attn_impl, seed=cfg.seed), self.device)
            self.peft = apply_lora(self.model, cfg) if cfg.finetuning_type == "lora" else None  # in place
            self.ref_model = None
            self.uses_reference = cfg.stage == "dpo" and cfg.pref_loss != "simpo"  # simpo is reference-free
            if self.uses_reference and (self.peft is None or separate_reference):
                self.ref_model = placed(build(cfg.model_name_or_path, self.dtype, attn_impl, seed=cfg.seed),
                                        self.device)
                self.ref_model.eval().requires_grad_(False)
        # One MLP chunk count for every rank and micro-batch, from the global shard length of the longest row the
        # data holds (F11: differing counts hang ZeRO-3); at full-length rows (synthetic-full) it is the memory
        # model's (runtime.memory.shard_tokens); short data under a long cutoff_len gets no needless chunks.
        self.features = cfg.memory_features
        self.tokenizer = load_tokenizer(cfg.model_name_or_path)
        self.schedule = schedule or build_schedule(cfg, self.pc.grid.dp, self.tokenizer, self.shapes.vocab)
        self.eval_schedule = build_eval_schedule(cfg, self.pc.grid.dp, self.tokenizer, self.shapes.vocab)
        longest = max(longest_row(self.schedule.units), longest_row(self.eval_schedule.units if self.eval_schedule else []))
        self.shard_tokens = shard_tokens(min(cfg.cutoff_len, longest), sp, cfg.rows_per_micro_batch)
        self.mlp_chunks = prepare_model(self.model, self.features, self.shard_tokens, mcfg.hidden_size)
        self.model.train()
        self.policy = TokenLogProbs(self.model, cfg.tiled_loss_chunk, cfg.checkpoint_offload)
        if self.ref_model is not None:  # no-grad forward: tiled MLP pieces run one after another, nothing saved
            prepare_model(self.ref_model, dataclasses.replace(self.features, gradient_checkpointing=False,
                                                              checkpoint_offload=False),
                          self.shard_tokens, mcfg.hidden_size)
            self.ref_model = TokenLogProbs(self.ref_model, cfg.tiled_loss_chunk, offload=False)
        self.comm = CommCounter()  # the attention's collectives of the current step (F12: > 0 when SP is on)
        self.attention = SPAttention(cfg.sequence_parallel_mode, self.pc,
                                     select_kernel(cfg.attention_kernel, self.device, self.dtype), self.comm)
        self.max_steps = self.schedule.steps(cfg.max_steps, cfg.num_train_epochs)
        self.eval_history: list[dict] = []
        self.metric_keys = ("loss",) if cfg.stage == "sft" else ("loss", *DPO_KEYS)
        self.trainable = trainable_parameters(self.model)  # all (full) or the adapters (lora)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.trainable, self.max_steps)
        self.engine = None
        if cfg.deepspeed:
            self.engine, self.optimizer, self.scheduler = init_deepspeed(cfg, self.policy, self.optimizer, self.scheduler,
                                                                         self.pc.grid.world, self.dtype, mcfg.hidden_size)
        self.captured_grads: dict[str, torch.Tensor] | None = None
        self.grad_step = 1 if self.peft is not None and self.max_steps > 1 else 0

    # ---- one micro-batch --------------------------------------------------------------------------
    def plan(self, seq_len: int):
        return shard_plan(self.cfg.sequence_parallel_mode, seq_len, self.cfg.sequence_parallel_size, self.ulysses)

    def _logprobs(self, model, lb: LocalBatch) -> torch.Tensor:
        kwargs = {"sp_batch": SPBatch(self.attention, lb.meta)} if self.cfg.uses_sp_attention else {}
        return model(lb.input_ids, lb.position_ids, lb.targets, **kwargs)

    def _sequence_sums(self, logp: torch.Tensor, lb: LocalBatch, n: int):
        """Global per-sequence (log-prob sum, supervised length) for the n dpo slots of this micro-batch."""
        # padding (slot −1) lands in bucket 0, which is dropped: no data-dependent shapes (fake-tensor traces)
        bucket = (lb.seq_slot + 1).reshape(-1)
        sums = logp.new_zeros(n + 1).index_add(0, bucket, logp.reshape(-1))[1:]
        supervised = (lb.targets != IGNORE).to(logp.dtype).reshape(-1)
        lens = logp.new_zeros(n + 1).index_add(0, bucket, supervised)[1:]
        return sum_shards(sums, self.pc.sp_group), all_reduce_(lens.detach(), self.pc.sp_group)

    def micro_objective(self, lb: LocalBatch, pairs, n_slots: int, denom: int, stats: dict) -> torch.Tensor:
        """This rank's share of the step objective for one micro-batch (to back-propagate)."""
        if self.cfg.stage == "sft":
            loss = sft_loss(self._logprobs(self.engine or self.policy, lb), lb.targets, denom)
            stats["loss"] += loss.detach() * denom  # report the objective actually back-propagated
            return loss
        ref = None
        if self.uses_reference:  # first, as DPO trainers precompute it: no policy activations alive yet
            # LoRA: the policy itself with adapters disabled (no second model); full: the frozen copy
            frozen = adapters_disabled(self.peft) if self.ref_model is None else contextlib.nullcontext()
            with torch.no_grad(), frozen:
                model = self.ref_model or self.engine or self.policy
                ref, _ = self._sequence_sums(self._logprobs(model, lb), lb, n_slots)
        pi, lens = self._sequence_sums(self._logprobs(self.engine or self.policy, lb), lb, n_slots)
        ref = torch.zeros_like(pi) if ref is None else ref
        c, r = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        out = preference_loss(self.cfg.pref_loss, pi[c], pi[r], ref[c], ref[r], lens[c], lens[r],
                              self.cfg.pref_beta, self.cfg.simpo_gamma)
        for key, val in (("loss", out.losses), ("rewards/chosen", out.chosen_rewards),
                         ("rewards/rejected", out.rejected_rewards),
                         ("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).to(pi.dtype)),
                         ("rewards/margins", out.chosen_rewards - out.rejected_rewards),
                         ("logps/chosen", pi[c]), ("logps/rejected", pi[r])):
            stats[key] += val.detach().sum()
        return out.losses.sum() / denom

    # ---- one optimizer step -----------------------------------------------------------------------
    def _reduce_grads(self) -> None:
        """Sum gradients over every rank, in place, one parameter at a time."""
        if self.pc.world_group is None or self.pc.grid.world == 1:
            return
        for p in self.trainable:
            if p.grad is None:  # a rank whose shard never used p still joins the collective
                p.grad = torch.zeros_like(p)
            all_reduce_(p.grad, self.pc.world_group)

    def step(self, step: int, capture_grads: bool = False, micro_batches: list[MicroBatch] | None = None,
             read_back: bool = True) -> dict:
        """Run optimizer step `step`; returns its metrics (identical on every rank, but for this rank's own
        rank_tokens, seq_tokens and sp_comm_bytes: what shows that SP was engaged).

        `micro_batches`: this rank's micro-batches of the step (default: from the schedule), for a caller that
        prepares the data outside a fake-tensor trace. `read_back=False` leaves loss and grad-norm values as
        tensors (a fake-tensor trace has no values to read).
        """
        cfg, t0 = self.cfg, time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        denom = self.schedule.step_denominator(step, cfg.stage)
        keys = self.metric_keys
        stats = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in keys}
        world = self.pc.grid.world
        if micro_batches is None:
            micro_batches = self.schedule.micro_batches(step, self.pc.dp_rank, self.tokenizer.pad_id)
        held = padded = 0  # tokens this rank held; of the padded micro-batches (SP engaged: held × sp = padded)
        for mb in micro_batches:
            lb = shard_batch(mb, self.plan, self.pc.sp_rank, self.device)
            held, padded = held + lb.input_ids.numel(), padded + mb.input_ids.shape[0] * self.plan(mb.seq_len).total_len
            loss = self.micro_objective(lb, mb.pairs, mb.num_slots, denom, stats)
            if self.engine is None:
                loss.backward()
            else:  # DeepSpeed averages over all `world` ranks and divides by grad accum: undo both
                self.engine.backward(loss * world * cfg.gradient_accumulation_steps)
                self.engine.step()  # steps the optimizer only at the accumulation boundary
        if self.engine is None:
            self._reduce_grads()
            if capture_grads:
                self.captured_grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                                       if p.requires_grad}
            grad_norm = clip_gradients(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = self.engine.get_global_grad_norm()
        # sft sums are disjoint over every rank; dpo pair values repeat on each SP rank: sum over DP only
        vec = torch.stack([stats[k] for k in keys])
        all_reduce_(vec, self.pc.world_group if cfg.stage == "sft" else self.pc.dp_group)
        read = float if read_back else (lambda t: t)
        metrics = {"step": step, "grad_norm": read(grad_norm), "lr": lr, "tokens": self.schedule.step_tokens(step)}
        metrics.update({k: read(v) / max(denom, 1) for k, v in zip(keys, vec)})
        metrics.update(rank_tokens=held, seq_tokens=padded, sp_comm_bytes=self.comm.total())  # this rank's own
        self.comm.records.clear()
        metrics["step_time_s"] = time.perf_counter() - t0
        return metrics

    def train(self, on_step: Callable[[dict], None] | None = None, capture_grads: bool = False,
              checkpoints: bool = False) -> list[dict]:
        """All steps, each followed by evaluation when due (eval_history); `on_step(metrics)` after each step and
        each evaluation. `checkpoints`: resume from and save checkpoints as the config says (runtime/checkpoint.py).
        Returns the step metrics."""
        cfg, history = self.cfg, []
        per_epoch = max(1, len(self.schedule.units) // self.schedule.global_batch)
        resume = checkpoint.resume_path(cfg.resume_from_checkpoint, cfg.output_dir) if checkpoints else None
        for s in range(checkpoint.load(self, resume) if resume else 0, self.max_steps):
            records = [self.step(s, capture_grads=capture_grads and s == self.grad_step)]
            history.append(records[0])
            if eval_due(cfg.eval_strategy, cfg.eval_steps, per_epoch, s, self.max_steps - 1):
                records.append(evaluate(self, s))
                self.eval_history.append(records[-1])
            for m in records if on_step is not None else ():
                on_step(m)
            if checkpoints and checkpoint.save_due(cfg.save_strategy, cfg.save_steps, per_epoch, s):
                checkpoint.save(self, cfg.output_dir, s + 1)
        if checkpoints and cfg.save_strategy != "no":
            checkpoint.save(self, cfg.output_dir, self.max_steps, final=True)
        return history
