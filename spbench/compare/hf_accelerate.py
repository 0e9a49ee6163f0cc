"""Hugging Face's own SP path: transformers' `Trainer` with `TrainingArguments(parallelism_config=
ParallelismConfig(sp_size=N, sp_backend="deepspeed"))` — accelerate hands the model to DeepSpeed ALST
(`UlyssesSPAttentionHF.register_with_transformers`, `UlyssesSPDataLoaderAdapter`) and the Trainer computes the
loss with `deepspeed_sp_compute_loss` (a token-weighted mean over the SP ranks of each micro-batch).

Everything that decides the numbers is HF's: its data-loader adapter shards the sequence, its loss, its gradient
accumulation (each micro-batch's mean / accumulation steps), DeepSpeed's engine (ZeRO stage of the case; stage 0
when the case has none, as a user without a ZeRO file gets), clipping and step. The harness supplies only what
makes the run comparable: the same initial weights, the trainer's AdamW + lr schedule (passed as `optimizers=`),
and the same micro-batches in the order the SP-off reference consumes them (a `get_train_dataloader` override:
HF's adapter makes every SP rank's batch one micro-step of the whole SP group, in SP-rank order). The loss it
reports is read from `training_step`'s return at float64 (the Trainer's log accumulates in float32); the grad
norm is the Trainer's logged one (DeepSpeed's). Gradients are not captured: DeepSpeed steps inside `backward`.

Measured on gloo CPU ranks, 2026-12-01 (transformers 5.24.0, accelerate 1.15.0, deepspeed 0.19.8): with no ZeRO
file DeepSpeed's engine refuses float64 gradients ("attempting to reduce an unsupported grad type: torch.float64");
under ZeRO-2 the run completes and its grad norm is SP × SP off's (2.0000 × at SP 2, 4.0000 × at SP 4: every SP
rank back-propagates the whole loss it all-gathered), its loss float32-rounded (transformers' causal-LM loss calls
`logits.float()`, also on a float64 model).
"""
from __future__ import annotations

import tempfile

import torch

from ..check.cases import Case
from .adapters import Implementation

ATTENTION = "sdpa intercepted by UlyssesSPAttentionHF"  # what the job reports when ALST's wrapper is in place


def _refuses(case: Case) -> str | None:
    if case.method != "ulysses":
        return f"ParallelismConfig sp_backend='deepspeed' is Ulysses (DeepSpeed ALST) only, not {case.method}"
    if case.stage != "sft":
        return "transformers Trainer has no DPO loss (TRL's DPOTrainer is not wired in this adapter)"
    unwired = [k for k in ("eval_strategy", "val_size", "eval_dataset") if k in case.config]
    unwired += ["LoRA"] if case.config.get("finetuning_type") == "lora" else []
    if unwired:
        return f"not wired in this adapter: {', '.join(unwired)}"
    return None


def step_order(micro_batches: list, sp: int, sp_rank: int) -> list:
    """The micro-batches this SP rank's loader yields so that HF's adapter processes `micro_batches` in order.

    UlyssesSPDataLoaderAdapter gathers one batch from every SP rank and runs them as sp consecutive micro-steps,
    rank 0's first: the loader of SP rank r yields micro-batches r, r + sp, r + 2·sp, ... (the tail is padded
    with the last one so every rank has the same count; the Trainer stops at max_steps before reaching it).
    E.g. 5 micro-batches [a b c d e] at sp 2: rank 0 [a c e], rank 1 [b d e]."""
    n = -(-len(micro_batches) // sp) * sp
    padded = micro_batches + micro_batches[-1:] * (n - len(micro_batches))
    return padded[sp_rank::sp]


def hf_batch(mb, length: int, pad_id: int) -> dict:
    """One spbench MicroBatch as the rows HF's SP loader expects: input_ids, position_ids, labels [rows, length]
    (right-padded: pad_id, positions counting on, label IGNORE); labels are the unshifted ones whose shift (HF's `shift_labels`) equals
    the trainer's targets (labels[i] = targets[i − 1])."""
    from runtime.losses import IGNORE

    rows, extra = mb.input_ids.shape[0], length - mb.seq_len
    ids = torch.nn.functional.pad(mb.input_ids, (0, extra), value=pad_id)          # [rows, L + extra]
    targets = torch.nn.functional.pad(mb.targets, (0, extra), value=IGNORE)        # [rows, L + extra]
    last = mb.position_ids[:, -1:]
    pos = torch.cat([mb.position_ids, last + torch.arange(1, extra + 1).expand(rows, extra)], dim=1)
    labels = torch.cat([torch.full((rows, 1), IGNORE), targets[:, :-1]], dim=1)    # shift_labels == targets
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


HF_AUTO = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def hf_deepspeed_config(path: str | None) -> dict:
    """The DeepSpeed config the HF path gets: the case's ZeRO file (ZeRO 0, no file, when the case has none) with
    the batch and clipping keys left to the Trainer as "auto", the way transformers' DeepSpeed docs write them."""
    import json
    from pathlib import Path

    ds = json.loads(Path(path).read_text(encoding="utf-8")) if path else {"zero_optimization": {"stage": 0}}
    return {**{k: "auto" for k in HF_AUTO}, **ds}


def _counting_attention(counter: list) -> None:
    """`counter` = [bytes so far, sp]. Wrap the attention registered under "sdpa" (ALST's wrapper once accelerate prepared the model) so its
    all-to-all bytes are counted from the tensors it exchanges, as the ALST attention adapter counts them."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner, sp = ALL_ATTENTION_FUNCTIONS["sdpa"], counter[1]

    def forward(module, query, key, value, *args, **kwargs):
        kv_rep = max(1, sp // key.shape[1])  # ALST replicates kv heads up to the SP degree
        counter[0] += (2 * query.numel() + 2 * key.numel() * kv_rep) * query.element_size() * (sp - 1) / sp
        return inner(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = forward  # where ALST put its wrapper (this instance's local mapping)


def train_with_hf_trainer(info, cfg_values: dict, capture_grads: bool = False, fixed_length: bool = True) -> dict | None:
    """Rank job: the case trained by transformers' Trainer under accelerate's ParallelismConfig(sp_size=SP).

    `fixed_length`: every micro-batch padded to the longest of the run (rounded up to a multiple of SP), as a user
    pads to max_length. Without it (lengths padded per micro-batch, the multiple of SP only), HF's loader adapter
    all-gathers batches of different lengths, which gloo refuses (ProcessGroupGloo::allgather: invalid tensor
    size), measured 2026-12-01 with deepspeed 0.19.8."""
    import torch.distributed as dist
    from accelerate.utils import ParallelismConfig
    from accelerate.utils.dataclasses import DeepSpeedSequenceParallelConfig
    from transformers import TrainingArguments
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from runtime.config import DTYPES, from_dict
    from runtime.models import build_model
    from runtime.optim import build_optimizer

    cfg = from_dict(cfg_values)
    sp, ga, world = cfg.sequence_parallel_size, cfg.gradient_accumulation_steps, dist.get_world_size()
    batches, steps = _replica_batches(cfg, world, dist.get_rank(), fixed_length)
    model = build_model(cfg.model_name_or_path, DTYPES[cfg.dtype], "sdpa", seed=cfg.seed)
    optimizer, scheduler = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], steps)
    ds = hf_deepspeed_config(cfg.deepspeed)
    pc = ParallelismConfig(sp_size=sp, sp_backend="deepspeed", sp_handler=DeepSpeedSequenceParallelConfig(
        sp_seq_length_is_variable=True, sp_attn_implementation="sdpa"))
    record = {"losses": [], "micro": 0, "held": 0, "steps": []}
    trainer_class, step_end = _trainer_classes(batches, sp, dist.get_rank(), ga, world, record)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.per_device_train_batch_size,
                                 gradient_accumulation_steps=ga, max_steps=steps, max_grad_norm=cfg.max_grad_norm,
                                 logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                                 seed=cfg.seed, dataloader_pin_memory=False, deepspeed=ds, parallelism_config=pc)
        trainer = trainer_class(model=model, args=args, optimizers=(optimizer, scheduler), callbacks=[step_end])
        try:
            trainer.train()
            intercepted = ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
        finally:
            _release(ALL_ATTENTION_FUNCTIONS, sdpa_attention_forward)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    metrics = [{**m, "grad_norm": float(g)} for m, g in zip(record["steps"], norms)]
    if info.rank != 0:
        return None
    return {"metrics": metrics, "grads": None, "grad_step": 0, "eval": [],
            "attention": ATTENTION if intercepted else model.config._attn_implementation, "sp_attention": ATTENTION}


def _replica_batches(cfg, world: int, rank: int, fixed_length: bool) -> tuple[list[dict], int]:
    """(this rank's DP replica's micro-batches as HF batches, in the reference's order; the step count). Lengths are
    padded to a multiple of SP: of the run's longest row (`fixed_length`) or of each micro-batch's own."""
    from runtime.models import model_config
    from runtime.records import build_schedule, load_tokenizer

    sp = cfg.sequence_parallel_size
    dp = world // sp
    tok = load_tokenizer(cfg.model_name_or_path)
    schedule = build_schedule(cfg, dp, tok, model_config(cfg.model_name_or_path).vocab_size)
    steps = schedule.steps(cfg.max_steps, cfg.num_train_epochs)
    every = [[mb for s in range(steps) for mb in schedule.micro_batches(s, d, tok.pad_id)] for d in range(dp)]
    longest = max(mb.seq_len for mbs in every for mb in mbs)
    return [hf_batch(mb, -(-(longest if fixed_length else mb.seq_len) // sp) * sp, tok.pad_id)
            for mb in every[rank // sp]], steps


def _trainer_classes(batches: list[dict], sp: int, rank: int, ga: int, world: int, record: dict):
    """(a Trainer subclass that feeds `batches` in the reference's order and counts what each step holds and
    sends; a callback that closes each step's record into record["steps"])."""
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sent = [0.0, sp]  # the attention's bytes of the current step (reset in place: the wrapper holds the list)

    class OrderedTrainer(Trainer):
        def get_train_dataloader(self):  # the reference's order; HF's SP adapter is applied to it by the Trainer
            return torch.utils.data.DataLoader(step_order(batches, sp, rank % sp), batch_size=None)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if record["micro"] == 0 and ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward:
                _counting_attention(sent)
            record["held"] += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["losses"].append(loss.detach().double())
            record["micro"] += 1
            return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            loss = torch.stack(record["losses"]).sum()
            dist.all_reduce(loss)  # the same on the SP ranks of a replica: mean over every rank = over replicas
            j = len(record["steps"]) * ga  # first micro-batch of this step in the replica's sequence
            padded = sum(b["input_ids"].numel() for b in batches[j:j + ga])
            record["steps"].append({"step": len(record["steps"]), "loss": loss.item() / world,
                                    "rank_tokens": record["held"], "seq_tokens": padded,
                                    "sp_comm_bytes": sent[0]})
            record.update(losses=[], held=0)
            sent[0] = 0.0
            return control

    return OrderedTrainer, StepEnd()


def _release(attention_functions, sdpa_forward) -> None:
    """Undo what the HF path leaves in this process, so the pool's next job starts clean: the "sdpa" attention
    ALST overrode, accelerate's state singletons, DeepSpeed's SP groups, transformers' DeepSpeed config ref."""
    from accelerate.state import AcceleratorState, GradientState
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    attention_functions["sdpa"] = sdpa_forward
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    parallel_state_sp._release_sequence_parallel_groups()
    unset_hf_deepspeed_config()


HF_ACCELERATE_SP = Implementation(
    name="hf-accelerate-sp", packages=("transformers", "accelerate", "deepspeed", "torch"),
    sp_job=train_with_hf_trainer, refuses=_refuses,
    features={"strategies": ["ulysses"], "gqa": "kv_heads divisible by SP or SP by kv_heads (ALST replicates)",
              "packing": "position_ids only (ALST drops the attention mask)", "dpo": "none in Trainer (TRL)",
              "zero": [0, 1, 2, 3], "loss": "mean of per-micro-batch token means under grad accumulation"})
