"""trainer.precision, trainer.microbatch_size_examples=auto and trainer.gradient_checkpointing (issue 25).

Mixed precision keeps fp32 master weights and optimizer state and runs forward passes under autocast;
bf16-true keeps the weights themselves in bf16, whose 8-bit mantissa loses an update smaller than half
the spacing around a weight: the hand-checkable case is an RMSNorm weight of exactly 1.0, where bf16's
next values are 1 - 2**-8 and 1 + 2**-7, so a step of 1e-5 rounds back to 1.0.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from dpo_cli import lean
from dpo_cli.cli import main
from dpo_cli.config import validate
from dpo_cli.distributed import deepspeed_config
from dpo_cli.engine.backends import SingleProcess
from dpo_cli.logps import model_token_logps
from dpo_cli.models import tiny_tokenizer
from tests.conftest import gqa_llama
from tests.test_config import compose_config
from tests.test_loop import _cfg, _train

# --- trainer.microbatch_size_examples=auto --------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (["stage=dpo"], 1, 8),  # 8 pairs, one pass
        (["stage=dpo", "trainer=zero2", "trainer.num_processes=8"], 8, 1),  # the README's 8 ranks
        (["stage=dpo", "trainer=zero2", "trainer.num_processes=2"], 2, 4),
        (["stage=dpo", "trainer=zero3", "trainer.num_processes=2", "trainer.batch_size_examples=64"], 2, 8),
        (["stage=dpo", "trainer.batch_size_examples=12"], 1, 6),  # the largest divisor <= the cap of 8
        (["stage=sft"], 1, 16),  # sft's cap is 16: its batch of 16 in one pass
        (["stage=dpo", "trainer=zero2", "trainer.num_processes=2", "trainer.batch_size_examples=14"], 2, 7),
    ],
)
def test_auto_picks_the_largest_micro_batch_that_divides_each_ranks_share(overrides, world, expected):
    cfg = compose_config(*overrides)
    assert cfg.trainer.microbatch_size_examples == "auto"
    validate(cfg, world)
    assert cfg.trainer.microbatch_size_examples == expected
    assert cfg.trainer.batch_size_examples % (expected * world) == 0


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["trainer.microbatch_size_examples=3"],
            ["trainer.batch_size_examples=8", "microbatch_size_examples=3"],
        ),
        (
            ["trainer=zero2", "trainer.num_processes=2", "trainer.microbatch_size_examples=8"],
            ["x 2 ranks", "microbatch_size_examples=auto picks one that divides"],
        ),
        (["trainer=zero2", "trainer.num_processes=3"], ["multiple of the 3 ranks"]),
        (["trainer.microbatch_size_examples=many"], ["must be auto or an integer >= 1"]),
        (
            ["trainer.precision=fp8"],
            ["trainer.precision=fp8: choose 32-true, bf16-mixed, 16-mixed or bf16-true"],
        ),
        (["trainer=zero2", "trainer.precision=bf16-true"], ["use trainer.precision=bf16-mixed"]),
        (["trainer.lean_memory=on", "trainer.precision=bf16-mixed"], ["gradient_checkpointing=true"]),
        (["trainer.lr_warmup_ratio=1.5"], ["trainer.lr_warmup_ratio=1.5: must be in [0, 1)"]),
        (["model.attn_implementation=flash"], ["model.attn_implementation=flash: choose sdpa, eager"]),
    ],
)
def test_bad_trainer_settings_fail_in_one_line(tmp_path, capsys, overrides, words):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "model=tiny", f"output_root={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert all(word in err for word in words), err


# --- trainer.precision ----------------------------------------------------------------------------------


def test_training_stages_take_the_weights_dtype_from_the_precision():
    """model.dtype (a preset's bfloat16) is what eval / prefs / winrate load; sft and dpo follow
    trainer.precision: fp32 master weights unless bf16-true."""
    for precision, dtype in [("32-true", "float32"), ("bf16-mixed", "float32"), ("bf16-true", "bfloat16")]:
        cfg = compose_config("stage=dpo", "model.dtype=bfloat16", f"trainer.precision={precision}")
        validate(cfg)
        assert cfg.model.dtype == dtype
    cfg = compose_config("stage=eval", "model.dtype=bfloat16")
    validate(cfg)
    assert cfg.model.dtype == "bfloat16"


def _one_step(precision: str, lr: float) -> tuple[torch.nn.Module, SingleProcess]:
    """One RMSprop step of the tiny Llama under `precision`; RMSprop's first step moves each weight by about
    10 x lr (v = 0.01 g**2, so g / sqrt(v) = 10), whatever the gradient's size."""
    cfg = _cfg(None, f"trainer.precision={precision}", "trainer.optimizer=rmsprop", f"lr={lr}")
    with open_dict(cfg):
        cfg.trainer.batch_size_examples, cfg.trainer.microbatch_size_examples = 1, 1
    model = gqa_llama()
    backend = SingleProcess(cfg, model, tiny_tokenizer(), torch.device("cpu"))
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with backend.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    backend.backward(loss)
    backend.step(apply=True)
    return model, backend


def test_a_small_update_survives_bf16_mixed_and_is_lost_under_bf16_true():
    lr = 1e-6  # the paper's learning rate: a step of ~1e-5 on each weight
    pure, _ = _one_step("bf16-true", lr)
    mixed, _ = _one_step("bf16-mixed", lr)
    norm_pure, norm_mixed = pure.model.norm.weight, mixed.model.norm.weight
    assert norm_pure.dtype == torch.bfloat16 and norm_mixed.dtype == torch.float32
    # Around 1.0 bf16 holds 1 - 2**-8 and 1 + 2**-7 only: the 1e-5 step rounds away, in every weight.
    assert torch.equal(norm_pure, torch.ones_like(norm_pure))
    moved = (norm_mixed - 1).abs()
    assert torch.all(moved > 5e-6) and torch.all(moved < 2e-5)


def test_mixed_precision_computes_in_bf16_and_scores_in_fp32():
    model = gqa_llama()
    cfg = _cfg(None, "trainer.precision=bf16-mixed")
    backend = SingleProcess(cfg, model, tiny_tokenizer(), torch.device("cpu"))
    ids = torch.tensor([[5, 9, 13, 17]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with backend.autocast():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
        per_token, _ = model_token_logps(model, batch)
    assert per_token.dtype == torch.float32
    plain, _ = model_token_logps(model, batch)
    torch.testing.assert_close(per_token, plain, atol=0.05, rtol=0)  # bf16 rounding, not another model


def test_bf16_mixed_trains_in_the_loop(tmp_path):
    cfg = _cfg(tmp_path, "trainer.precision=bf16-mixed")
    model, metrics, _ = _train(cfg, tmp_path / "run")
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert evals[-1] < evals[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_mixed_scales_the_loss_and_skips_an_overflowing_step():
    model, backend = _one_step("16-mixed", 1e-3)
    assert backend.scaler.is_enabled() and not backend.overflowed
    assert backend.scaler.get_scale() == 2.0**16  # the default start, kept after a good step
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.tensor([[5, 9, 13, 17]])
    with backend.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    backend.backward(loss * 1e30)  # fp16 gradients overflow to inf
    backend.step(apply=True)
    assert backend.overflowed and backend.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_deepspeed_mixed_precision_is_its_bf16_or_fp16_section():
    for precision, bf16, fp16 in [
        ("32-true", False, False),
        ("bf16-mixed", True, False),
        ("16-mixed", False, True),
    ]:
        cfg = compose_config("stage=dpo", "trainer=zero2", f"trainer.precision={precision}")
        validate(cfg, 2)
        config = deepspeed_config(cfg.trainer, world=2, cuda=True)
        assert config["bf16"]["enabled"] is bf16 and config["fp16"]["enabled"] is fp16
    assert config["fp16"]["loss_scale"] == 0  # dynamic


# --- trainer.gradient_checkpointing ---------------------------------------------------------------------


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [7, 11, 15, 19, 23, 27, 31, 35]])
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("lean_memory", ["off", "on"])
def test_gradient_checkpointing_gives_the_same_gradients(lean_memory):
    """transformers' own checkpointing, alone and with the lean layers inside the checkpointed layers."""
    expected = _gradients(gqa_llama())
    cfg = _cfg(None, "trainer.gradient_checkpointing=true", f"trainer.lean_memory={lean_memory}")
    model = gqa_llama()
    SingleProcess(cfg, model, tiny_tokenizer(), torch.device("cpu"))
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    got = _gradients(model)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_checkpointing_turns_auto_lean_layers_off():
    big = torch.nn.Linear(1, lean.AUTO_MIN_PARAMETERS, bias=False)
    assert lean.wanted("auto", big) and not lean.wanted("auto", big, checkpointing=True)
    assert lean.wanted("on", big, checkpointing=True)
