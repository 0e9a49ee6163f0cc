"""Checkpoints: the model in Hugging Face format plus a resumable state, written atomically; exact resume.

`output_dir/checkpoint-N` (N = optimizer steps done) holds the model as `save_pretrained` writes it (full
fine-tuning: config + safetensors, loadable by plain `AutoModelForCausalLM.from_pretrained`; LoRA: peft's adapter
files), the tokenizer when the model has one, and, unless save_only_model, what resuming needs: optimizer and
scheduler states, every rank's RNG state, and trainer_state.json (steps done; the data position follows from it,
since data order is a function of seed and step). The final model goes to output_dir itself.

A checkpoint is complete or absent: it is written into a hidden temporary folder, fsynced, and renamed; a crash
mid-save leaves the previous checkpoints untouched. save_total_limit removes the oldest complete ones after a save,
never the newest. Nothing depends on the SP layout: states are full, not sharded, so a run may resume with another
SP size or strategy at the same global batch. Under DeepSpeed the model is gathered from its ZeRO-3 partitions
to be saved, and the resumable state is DeepSpeed's own checkpoint (`deepspeed/`, one partition file per rank),
which resumes on the world size and ZeRO stage it was written with (checked before any rank starts).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import InputError

STATE = "trainer_state.json"
PREFIX = "checkpoint-"


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message names it and the fix."""


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(steps, folder) of every complete checkpoint in `output_dir`, oldest first."""
    folder = Path(output_dir)
    found = []
    for p in folder.glob(PREFIX + "*") if folder.is_dir() else []:
        suffix = p.name[len(PREFIX):]
        if suffix.isdigit() and (p / STATE).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def resume_path(resume, output_dir: str) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names (true: the latest complete one in output_dir), or None."""
    if resume in (None, False):
        return None
    if resume is True:
        found = complete_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint")
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE).is_file():
        raise CheckpointError(f"resume_from_checkpoint {resume!r} is not a complete spbench checkpoint "
                              f"(no {STATE}); name a checkpoint-N folder or use true")
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    if not state.get("resumable"):
        raise CheckpointError(f"checkpoint {resume} was saved with save_only_model: true and holds no optimizer state")
    return path


def save_due(strategy: str, every: int, steps_per_epoch: int, step: int) -> bool:
    """Whether a checkpoint follows optimizer step `step` (0-based): every `every` steps, or at each epoch's end."""
    if strategy == "no":
        return False
    return (step + 1) % (every if strategy == "steps" else steps_per_epoch) == 0


def layout(cfg, world: int) -> dict:
    """What a DeepSpeed checkpoint depends on: its states are partitioned over `world` ranks by ZeRO stage."""
    if cfg.deepspeed is None:
        return {"deepspeed": False}
    from .dsconfig import read_deepspeed_json

    stage = int(read_deepspeed_json(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0))
    return {"deepspeed": True, "world": world, "zero": stage}


def check_layout(state: dict, cfg, world: int, path) -> None:
    """Refuse (one line) a resume the checkpoint cannot serve: DeepSpeed states resume only on their own layout."""
    now = layout(cfg, world)
    if state.get("deepspeed", False) != now["deepspeed"]:
        kind = "a DeepSpeed" if state.get("deepspeed") else "a plain (non-DeepSpeed)"
        raise CheckpointError(f"checkpoint {path} is {kind} checkpoint and this run is not; resume it with the "
                              f"deepspeed setting it was written with")
    if now["deepspeed"] and (state["world"], state["zero"]) != (now["world"], now["zero"]):
        raise CheckpointError(f"checkpoint {path} holds ZeRO-{state['zero']} states partitioned over {state['world']} "
                              f"ranks; resume it on {state['world']} ranks with ZeRO-{state['zero']} (this run: "
                              f"{now['world']} ranks, ZeRO-{now['zero']})")


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


@contextlib.contextmanager
def _gathered(trainer):
    """Every parameter whole on this rank (ZeRO-3 partitions gathered; a no-op otherwise)."""
    if trainer.engine is None or trainer.engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters()), modifier_rank=None):
        yield


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_model(trainer, folder: Path) -> None:
    """Rank 0 writes the model (and tokenizer) into `folder`; every rank must call it (ZeRO-3 gathers)."""
    with _gathered(trainer):
        if trainer.pc.rank == 0:
            if trainer.peft is not None:  # peft's own save drops adapters inside a tiled MLP: write its format here
                from safetensors.torch import save_file

                save_file(_adapter_state(trainer), folder / "adapter_model.safetensors")
                trainer.peft.peft_config["default"].save_pretrained(folder)
            else:
                state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
                trainer.model.save_pretrained(folder, state_dict=state)
            hf = getattr(trainer.tokenizer, "tok", None)
            if hf is not None:
                hf.save_pretrained(folder)


def _adapter_state(trainer) -> dict[str, torch.Tensor]:
    """The LoRA weights under peft's saved names (the model's state-dict names, adapter name dropped)."""
    return {k.replace(".default", ""): v.detach().cpu().clone() for k, v in trainer.peft.state_dict().items()
            if ".lora_" in k}


def save(trainer, output_dir: str, steps_done: int, final: bool = False) -> Path | None:
    """Write checkpoint-`steps_done` (or, `final`, the model into output_dir); collective. Returns the folder."""
    cfg, rank = trainer.cfg, trainer.pc.rank
    out = Path(output_dir)
    target = out if final else out / f"{PREFIX}{steps_done}"
    tmp = out / f".tmp-{target.name}"  # a crash leaves it behind; the next save of that name clears it
    rngs = _all_rng_states(trainer)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(trainer)
    _write_model(trainer, tmp)
    resumable = not cfg.save_only_model and not final
    if resumable and trainer.engine is not None:  # every rank writes its ZeRO partition of the states
        trainer.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        _barrier(trainer)
    if rank == 0:
        if resumable and trainer.engine is None:
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        if resumable:
            torch.save(rngs, tmp / "rng_state.pt")
        state = {"steps_done": steps_done, "max_steps": trainer.max_steps, "resumable": resumable,
                 "global_batch": trainer.schedule.global_batch, "seed": cfg.seed, "stage": cfg.stage,
                 "finetuning_type": cfg.finetuning_type, "sequence_parallel_size": cfg.sequence_parallel_size,
                 **layout(cfg, trainer.pc.grid.world)}
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        _fsync_tree(tmp)
        if final:
            for p in tmp.iterdir():
                os.replace(p, out / p.name)
            tmp.rmdir()
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            _prune(out, cfg.save_total_limit)
    _barrier(trainer)
    return target


def _prune(out: Path, limit: int | None) -> None:
    found = complete_checkpoints(out)
    if limit is None or len(found) <= limit:
        return
    for _, folder in found[: len(found) - max(limit, 1)]:  # oldest first; the newest always stays
        shutil.rmtree(folder, ignore_errors=True)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _all_rng_states(trainer) -> list[dict]:
    """Every rank's RNG state, gathered to each rank (dropout masks are drawn per rank)."""
    mine = _rng_state()
    if trainer.pc.world_group is None or trainer.pc.grid.world == 1:
        return [mine]
    out: list = [None] * trainer.pc.grid.world
    dist.all_gather_object(out, mine, group=trainer.pc.world_group)
    return out


def _barrier(trainer) -> None:
    if trainer.pc.world_group is not None and trainer.pc.grid.world > 1:
        dist.barrier(group=trainer.pc.world_group)


def load(trainer, path: Path) -> int:
    """Restore weights, optimizer, scheduler and RNG from checkpoint `path`; returns the steps already done."""
    state = read_state(path)
    if state["global_batch"] != trainer.schedule.global_batch or state["seed"] != trainer.cfg.seed:
        raise CheckpointError(f"checkpoint {path} was trained with global batch {state['global_batch']} and seed "
                              f"{state['seed']}; this run has {trainer.schedule.global_batch} and {trainer.cfg.seed}: "
                              f"the data order would differ")
    check_layout(state, trainer.cfg, trainer.pc.grid.world, path)
    if trainer.engine is not None:  # weights, optimizer and scheduler from the partitions
        trainer.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    else:
        _load_weights(trainer, path)
        trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rngs = torch.load(path / "rng_state.pt", weights_only=False)
    mine = rngs[trainer.pc.rank] if trainer.pc.rank < len(rngs) else rngs[0]  # another world size: rank 0's
    torch.set_rng_state(mine["cpu"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    return int(state["steps_done"])


def _load_weights(trainer, path: Path) -> None:
    from safetensors.torch import load_file

    if trainer.peft is not None:
        saved = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                 for k, v in load_file(path / "adapter_model.safetensors").items()}
        missing, unexpected = trainer.peft.load_state_dict(saved, strict=False)
        absent = set(_adapter_state(trainer)) - {k.replace(".default", "") for k in saved}
        if unexpected or absent:
            raise CheckpointError(f"checkpoint {path}: its adapters do not fit this LoRA config (unexpected "
                                  f"{sorted(unexpected)[:2]}, absent {sorted(absent)[:2]})")
        return
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights = {k: v for f in files for k, v in load_file(path / f).items()}
    missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if "lm_head" in k and trainer.model.config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
