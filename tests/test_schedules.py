"""trainer.lr_schedule and the warm-up (dpo_cli/optim.py): transformers' schedules, shifted one step so
that step s (from 0) of a warm-up over w steps trains at (s + 1) / (w + 1) of `lr`, as the paper's code.

Hand-derived factors for T steps and w warm-up steps, s = 0 .. T-1, once s >= w:
    constant: 1
    linear:   (T - s) / (T - w)                       (the last step at 1 / (T - w), not 0)
    cosine:   (1 + cos(pi (s - w) / (T - w))) / 2
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from dpo_cli.cli import main
from dpo_cli.logging import read_metrics
from dpo_cli.optim import schedule


def _factors(schedule_name: str, num_steps: int, warmup_steps: int = 0, warmup_ratio=None) -> list[float]:
    t = OmegaConf.create(
        {"lr_schedule": schedule_name, "lr_warmup_steps": warmup_steps, "lr_warmup_ratio": warmup_ratio}
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule(t, optimizer, num_steps)
    factors = []
    for _ in range(num_steps):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


def test_constant_after_the_papers_warm_up():
    assert _factors("constant", 5, warmup_steps=2) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert _factors("constant", 3) == pytest.approx([1, 1, 1])


def test_linear_decays_to_one_step_above_zero():
    assert _factors("linear", 4) == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4])
    assert _factors("linear", 5, warmup_steps=1) == pytest.approx([1 / 2, 1, 3 / 4, 2 / 4, 1 / 4])


def test_cosine_after_a_warm_up_ratio():
    # warm-up ratio 0.25 of 8 steps: 2 steps, then half a cosine over the remaining 6.
    expected = [1 / 3, 2 / 3] + [(1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert _factors("cosine", 8, warmup_ratio=0.25) == pytest.approx(expected)


def test_the_stage_logs_the_schedules_learning_rates(tmp_path):
    main(["sft", "model=tiny", "logger=none", f"output_root={tmp_path}", "trainer.max_steps=4",
          "trainer.batch_size_examples=4", "eval.num_prompts=0", "lr=1e-3", "trainer.lr_schedule=linear",
          "trainer.lr_warmup_ratio=0.25", "trainer.eval_every_steps=4", "run_name=lin"])  # fmt: skip
    lrs = [m["train/lr"] for m in read_metrics(tmp_path / "default" / "sft" / "lin") if "train/lr" in m]
    # 1 warm-up step of 4: 1/2, then (4 - s) / 3 for s = 1, 2, 3.
    assert lrs == pytest.approx([1e-3 / 2, 1e-3, 2e-3 / 3, 1e-3 / 3])
