"""LoRA (finetuning_type: lora, through peft): config rules, what trains, and oracles at SP 1.

The SP-on side is the parity suite's job (spbench/suites/ci.toml: lora*, SP on vs off in float64); here the SP-off
runtime is held against computations done with plain transformers + peft.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from runtime.config import ConfigError, from_dict
from runtime.lora import adapter_parameter_count, linear_names, meta_model, resolve_targets
from runtime.losses import IGNORE
from runtime.models import build_model, model_config
from runtime.records import ByteTokenizer
from runtime.train import Trainer, preflight

BASE = dict(dtype="float64", cutoff_len=40, max_samples=8, max_steps=1, device="cpu", learning_rate=1e-3,
            finetuning_type="lora")
TINY_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _perturb_adapters(model, seed=1):
    """Non-zero B (peft starts B at 0: adapted = base, A's gradients 0), so every adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("values, message", [
    ({"finetuning_type": "freeze"}, "finetuning_type freeze is not implemented; use full or lora"),
    ({"finetuning_type": "qlora"}, "finetuning_type 'qlora' is unknown; use full or lora"),
    ({"lora_rank": 0}, "lora_rank must be ≥ 1, got 0"),
    ({"lora_alpha": 0}, "lora_alpha must be > 0 or null (2 × lora_rank), got 0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
    ({"lora_target": " , "}, "lora_target ' , ' names no module; use all or e.g. q_proj,v_proj"),
])
def test_bad_lora_keys_are_one_line_errors(values, message):
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    assert str(e.value) == message


def test_unknown_lora_target_is_a_preflight_error_naming_the_known_modules():
    cfg = from_dict({**BASE, "lora_target": "q_proj,qkv_proj", "dtype": "float64"})
    with pytest.raises(ConfigError) as e:
        preflight(cfg, world=1)
    assert str(e.value) == ("lora_target 'q_proj,qkv_proj': no linear module named qkv_proj in the decoder; known: all, "
                            + ", ".join(TINY_LINEARS))
    assert linear_names(meta_model(model_config("tiny"))) == TINY_LINEARS  # lm_head is no target
    assert resolve_targets("all", TINY_LINEARS) == TINY_LINEARS


def test_only_adapters_train_and_their_count_is_peft_s():
    t = Trainer(from_dict({**BASE, "lora_rank": 4, "lora_target": "q_proj,down_proj"}))
    trainable = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert [p for g in t.optimizer.param_groups for p in g["params"]] == list(trainable.values())
    n_peft, _ = t.peft.get_nb_trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == n_peft == \
        adapter_parameter_count(meta_model(model_config("tiny")), 4, ["q_proj", "down_proj"])
    assert t.ref_model is None and t.peft.peft_config["default"].lora_alpha == 8  # null alpha = 2 × rank
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    t.train()
    assert all(torch.equal(p, frozen[n]) for n, p in t.model.named_parameters() if n in frozen)


def test_adapter_init_follows_the_seed_and_leaves_the_rng_alone():
    def adapters(seed):
        torch.manual_seed(123)
        t = Trainer(from_dict({**BASE, "seed": seed}))
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}, torch.rand(1)
    (a, ra), (b, rb), (c, _) = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(a[n], b[n]) for n in a) and torch.equal(ra, rb)
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)


def _oracle_sft(t, cfg_values, micro_batches, denom):
    """Loss and adapter gradients of the step with plain transformers + peft, float64 CE by hand. SDPA attention:
    transformers' eager attention takes its softmax in float32 (2e-10 off in float64, even without LoRA)."""
    import peft
    from transformers import AutoModelForCausalLM

    config = model_config("tiny")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64)
    trained = {n.replace(".mlp.mlp.", ".mlp."): p for n, p in t.model.state_dict().items()}  # TiledMLP names
    model.load_state_dict({n.replace(".base_layer.", "."): v for n, v in trained.items() if "lora_" not in n})
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg_values["lora_rank"], lora_alpha=16,
                                                       target_modules="all-linear"), autocast_adapter_dtype=False)
    base = model.get_base_model()
    base.load_state_dict(trained)  # the trainer's adapters (peft's own init overwritten)
    assert all(torch.equal(p, trained[n]) for n, p in base.named_parameters())
    loss = 0
    for mb in micro_batches:
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids).logits  # [b, s, V] float64
        loss = loss + F.cross_entropy(logits.flatten(0, 1), mb.targets.flatten(), ignore_index=IGNORE,
                                      reduction="sum") / denom
    loss.backward()
    return loss.item(), {n: p.grad for n, p in base.named_parameters() if p.requires_grad}


def test_lora_sft_equals_plain_peft_with_checkpointing_and_tiled_mlp():
    """Step loss and every adapter's gradient (checkpointed layers over frozen embeddings, LoRA inside the tiled
    MLP) equal transformers + peft (no tiling, no checkpointing) computed in float64 by hand."""
    values = {**BASE, "lora_rank": 4, "lora_alpha": 16, "gradient_checkpointing": True, "tiled_mlp_chunks": 3,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    t = Trainer(from_dict(values))
    _perturb_adapters(t.model)
    mbs = t.schedule.micro_batches(0, 0, ByteTokenizer.pad_id)
    want_loss, want_grads = _oracle_sft(t, values, mbs, t.schedule.step_denominator(0, "sft"))
    got = t.step(0, capture_grads=True)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-10)
    grads = {n.replace(".mlp.mlp.", ".mlp."): g for n, g in t.captured_grads.items()}
    assert set(grads) == set(want_grads) and len(grads) == 2 * 2 * len(TINY_LINEARS)
    for n, g in want_grads.items():
        assert g.abs().max() > 0, n  # layer 0's adapters too: checkpointing did not cut the graph
        assert (grads[n] - g).abs().max() <= 1e-10 * g.abs().max(), n


def test_lora_dpo_reference_is_the_base_model():
    """DPO with LoRA: one model; the reference log-probs are the base model's (an independently built copy here),
    not the adapted policy's, so the step-0 loss of a perturbed adapter is the textbook formula's."""
    t = Trainer(from_dict({**BASE, "stage": "dpo", "pref_beta": 0.3}))
    assert t.ref_model is None
    _perturb_adapters(t.model)
    base = build_model("tiny", torch.float64, "sdpa", seed=0)
    chosen, rejected = t.schedule.step_units(0)[0].docs

    def logp(model, doc):
        tgt = torch.tensor([doc.targets()])
        logits = model(input_ids=torch.tensor([doc.input_ids])).logits
        lp = torch.gather(F.log_softmax(logits, -1), -1, tgt.clamp_min(0)[..., None])[..., 0]
        return float(lp[tgt != IGNORE].sum())

    with torch.no_grad():
        pc, pr, rc, rr = logp(t.model, chosen), logp(t.model, rejected), logp(base, chosen), logp(base, rejected)
    assert abs((pc - rc) - (pr - rr)) > 1e-3  # the adapters move the margin: the check has teeth
    want = -math.log(1 / (1 + math.exp(-0.3 * ((pc - rc) - (pr - rr)))))
    m = t.step(0)
    assert m["loss"] == pytest.approx(want, rel=1e-10)
    assert m["rewards/chosen"] == pytest.approx(0.3 * (pc - rc), rel=1e-9)


def test_lora_simpo_needs_no_reference():
    t = Trainer(from_dict({**BASE, "stage": "dpo", "pref_loss": "simpo"}))
    assert t.ref_model is None and not t.uses_reference
    assert math.isfinite(t.step(0)["loss"])


@pytest.mark.parametrize("lines, message", [
    ("finetuning_type: lora\nlora_target: q_proj,qkv\n", "no linear module named qkv in the decoder; known: all, down_proj"),
    ("finetuning_type: freeze\n", "finetuning_type freeze is not implemented; use full or lora"),
    ("finetuning_type: lora\nlora_rank: 0\n", "lora_rank must be ≥ 1, got 0"),
])
def test_bad_lora_config_is_one_line_exit_2_before_any_rank(tmp_path, capsys, lines, message):
    from spbench.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: tiny\noutput_dir: {tmp_path / 'run'}\n" + lines)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
