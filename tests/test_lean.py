"""Lean autograd (dpo_cli/lean.py): the same forward values and gradients, fewer saved activations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpo_cli import lean
from dpo_cli.cli import main
from dpo_cli.logging import read_metrics
from dpo_cli.logps import model_token_logps
from tests.conftest import gqa_llama


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 10), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def saved_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor], monkeypatch) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward (inside lean decoder
    layers: the tensors lean's own saved-tensor hook keeps)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and (ptr := t.untyped_storage().data_ptr()) not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    lean_pack = lean._pack
    monkeypatch.setattr(lean, "_pack", lambda t: pack(lean_pack(t)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_token_logps(model, inputs)
    return sum(seen.values())


@pytest.mark.parametrize("mlp_bias, trim_heap", [(False, False), (True, True)])
def test_lean_blocks_give_the_same_values_and_gradients(mlp_bias, trim_heap):
    plain = gqa_llama(mlp_bias=mlp_bias)
    leaned = copy.deepcopy(plain)
    # 2 layers x (2 RMSNorms + 1 MLP) + the final norm.
    assert lean.apply(leaned, trim_heap=trim_heap) == 7
    inputs = batch()
    expected, mask = model_token_logps(plain, inputs)
    got, got_mask = model_token_logps(leaned, inputs)
    assert torch.equal(mask, got_mask)
    assert torch.equal(got, expected)  # the forward is bit-identical
    weights = torch.linspace(-1, 2, expected.numel()).reshape(expected.shape)  # a non-uniform upstream grad
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    # A second micro-batch accumulates into the gradients the first left.
    for model in (plain, leaned):
        per_token, _ = model_token_logps(model, inputs)
        (per_token * weights.flip(0)).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), leaned.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_lean_blocks_save_less_for_backward(monkeypatch):
    plain = gqa_llama()
    leaned = copy.deepcopy(plain)
    lean.apply(leaned)
    inputs = batch()
    before, after = saved_bytes(plain, inputs, monkeypatch), saved_bytes(leaned, inputs, monkeypatch)
    # Per token and layer: 4 x hidden (each norm's normalised input and its output, which the projections
    # after it save) + 3 x intermediate (up, silu(gate), silu(gate) * up) floats fewer; 30 tokens,
    # 2 layers, plus the final norm's normalised input (its output reaches the LM head as a gathered copy).
    tokens, hidden, intermediate = 30, 32, 96
    assert before - after == 4 * tokens * (2 * (4 * hidden + 3 * intermediate) + hidden)


def test_other_modules_are_left_alone():
    class GemmaRMSNorm(torch.nn.Module):  # (1 + weight) * x / rms(x): must not take Llama's forward
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    model = torch.nn.Sequential(GemmaRMSNorm(), torch.nn.Linear(4, 4))
    assert lean.apply(model) == 0


def test_auto_turns_lean_memory_on_only_for_real_model_sizes():
    assert not lean.wanted("auto", gqa_llama())  # ~30k parameters: a toy
    assert lean.wanted("on", gqa_llama()) and not lean.wanted("off", gqa_llama())
    big = torch.nn.Linear(1, lean.AUTO_MIN_PARAMETERS, bias=False)
    assert lean.wanted("auto", big)


@pytest.mark.slow
def test_a_dpo_run_with_lean_memory_matches_one_without(tmp_path):
    common = [
        "model=tiny",
        "logger=none",
        f"output_root={tmp_path}",
        "trainer.max_steps=3",
        "trainer.batch_size_examples=8",
        "trainer.microbatch_size_examples=4",  # accumulation: gradients summed over lean backward passes
        "trainer.eval_every_steps=3",
        "data.max_eval_examples=8",
        "eval.num_prompts=0",
        "lr=1e-3",
    ]
    main(["sft", *common, "run_name=sft"])
    checkpoint = tmp_path / "default" / "sft" / "sft" / "final"
    metrics = {}
    for setting in ("on", "off"):
        main(
            [
                "dpo",
                *common,
                f"sft_checkpoint={checkpoint}",
                f"trainer.lean_memory={setting}",
                f"run_name={setting}",
            ]
        )
        metrics[setting] = read_metrics(tmp_path / "default" / "dpo" / setting)
    for key in ("train/loss", "train/grad_norm", "eval/loss", "eval/rewards/margins"):
        on = [m[key] for m in metrics["on"] if key in m]
        off = [m[key] for m in metrics["off"] if key in m]
        assert len(on) == len(off) >= 2
        assert on == pytest.approx(off, rel=1e-5, abs=1e-6), key
    # The updates moved the policy: a later loss differs from the first (ln 2).
    assert metrics["on"][-1].get("eval/loss") != pytest.approx(math.log(2), abs=1e-4)
