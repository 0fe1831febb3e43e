"""LoRA and QLoRA (peft): the reference is the policy with its adapter off, final/ is merged and its
adapter loads with peft, resume is bit-identical, and every SFT/DPO combination starts DPO at log 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_cli.checkpoints import save_model
from dpo_cli.cli import main
from dpo_cli.config import ModelConfig
from dpo_cli.logging import read_metrics
from dpo_cli.models import load_model

pytestmark = pytest.mark.slow
TINY = ["model=tiny", "logger=none", "data.max_eval_examples=16", "eval.num_prompts=4", "lr=1e-3"]


def run(root: Path, stage: str, name: str, *overrides: str) -> Path:
    main([stage, *TINY, f"output_root={root}", f"run_name={name}", *overrides])
    return root / "default" / stage / name


def train_losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    run(root, "sft", "lora", "peft=lora", "trainer.max_steps=3", "trainer.eval_every_steps=3")
    return root


def test_lora_sft_writes_a_merged_model_and_its_adapter(lora_sft):
    from peft import PeftModel

    final = lora_sft / "default" / "sft" / "lora" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)

    def base():  # the model SFT started from
        return load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=0)[0]

    again = PeftModel.from_pretrained(base(), final / "adapter").merge_and_unload()
    for (name, a), b in zip(merged.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(merged.state_dict().values(), base().state_dict().values(), strict=True)
    )
    [line] = [m for m in read_metrics(final.parent) if "train/trainable_parameters" in m]
    assert 0 < line["train/trainable_parameters"] < line["train/parameters"]


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_lora_dpo_after_lora_sft_starts_at_log_2_without_a_second_model(lora_sft, monkeypatch, precompute):
    from dpo_cli.stages import dpo as stage

    loads = []
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: loads.append(1) or load_model(*a, **k))
    run_dir = run(lora_sft, "dpo", f"lora_{precompute}", "peft=lora", "trainer.max_steps=2",
                  f"ref.precompute={precompute}")  # fmt: skip
    assert train_losses(run_dir)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert read_metrics(run_dir)[0]["eval/kl"] == 0.0  # step 0: the policy is its reference
    assert len(loads) == 2  # the policy, and the base reloaded once to merge final/ (no reference copy)
    assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_dpo_after_lora_sft_and_lora_dpo_after_full_sft(lora_sft):
    full = run(lora_sft, "dpo", "full_after_lora", "trainer.max_steps=1")
    assert train_losses(full)[0] == pytest.approx(math.log(2), abs=1e-6)
    full_sft = run(lora_sft, "sft", "full", "trainer.max_steps=2", "eval.num_prompts=0")
    lora = run(lora_sft, "dpo", "lora_after_full", "peft=lora", "trainer.max_steps=1",
               f"sft_checkpoint={full_sft / 'final'}")  # fmt: skip
    assert train_losses(lora)[0] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_resume_is_bit_identical_and_checkpoints_hold_only_the_adapter(lora_sft):
    common = ["peft=lora", "trainer.max_steps=4", "trainer.eval_every_steps=10", "eval.num_prompts=0"]
    straight = run(lora_sft, "dpo", "straight", *common)
    halves = run(lora_sft, "dpo", "halves", *common, "trainer.save_every_steps=2", "trainer.max_steps=2")
    # Continue the 2-step run as the 4-step one: its step-2 checkpoint, a new final/.
    checkpoint = halves / "checkpoints" / "step-2"
    assert not checkpoint.exists()  # a finished run keeps final/, not its last step
    halves = run(lora_sft, "dpo", "halves2", *common, "trainer.save_every_steps=2")
    checkpoint = halves / "checkpoints" / "step-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (
        checkpoint / "model.safetensors"
    ).exists()
    (halves / "final").rename(halves.parent / "halves2_final")
    run(lora_sft, "dpo", "halves2", *common, "trainer.save_every_steps=2", "resume=true")
    a, b = (
        load_file(straight / "final" / "model.safetensors"),
        load_file(halves / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(straight) == train_losses(halves)


def test_qlora_trains_on_a_4bit_base_and_exports_in_full_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU 4-bit kernels need layers of at least 64 features.
    tiny = OmegaConf.structured(ModelConfig(name="tiny", tiny_hidden_size=64))
    save_model(*load_model(tiny, seed=0), tmp_path / "sft")
    run_dir = run(
        tmp_path, "dpo", "qlora", "peft=qlora", "trainer.max_steps=2", f"sft_checkpoint={tmp_path / 'sft'}"
    )
    assert train_losses(run_dir)[0] == pytest.approx(math.log(2), abs=1e-6)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert all(p.dtype == torch.float32 for p in final.parameters())
    assert not hasattr(final.config, "quantization_config")


def test_qlora_refuses_a_model_it_cannot_quantise(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "sft", "q", "peft=qlora", "trainer.max_steps=1")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "peft=qlora" in err and "\n" not in err.strip()


@pytest.mark.parametrize("lean_memory", [False, True])
def test_lora_log_probs_and_gradients_through_the_one_scoring_path(lean_memory):
    """A LoRA policy scores through the chunked head exactly as a plain forward does, with the lean
    layers too (they leave LoRA-wrapped projections plain and still rebuild the norms' outputs); the
    ReferenceView scores as the base model itself, in eval mode, and leaves the policy in train mode."""
    import copy

    from peft import get_peft_model

    from dpo_cli import adapters, lean
    from dpo_cli.logps import model_token_logps, token_logps
    from tests.conftest import gqa_llama
    from tests.test_lean import batch

    base = gqa_llama()
    cfg = OmegaConf.create(
        {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "modules_to_save": []}
    )
    policy = get_peft_model(copy.deepcopy(base), adapters.lora_config(cfg))
    for name, p in policy.named_parameters():  # a non-zero adapter, so that it changes the outputs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(policy)
    if lean_memory:
        lean.apply(policy)
    inputs = batch()
    got, mask = model_token_logps(policy, inputs)
    expected, _ = token_logps(plain(input_ids=inputs["input_ids"]).logits, inputs["labels"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(policy.named_parameters(), plain.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    policy.train()
    reference, _ = model_token_logps(adapters.ReferenceView(policy), inputs)
    base_logps, _ = token_logps(base(input_ids=inputs["input_ids"]).logits, inputs["labels"])
    torch.testing.assert_close(reference, base_logps, atol=1e-5, rtol=0)
    assert policy.training and not torch.allclose(reference, got)
