"""The training loop itself (dpo_cli/engine/loop.py) on a tiny model, in-process: steps, accumulation,
logging, eval points, skipped batches, checkpoints and resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dpo_cli.config import conf_dir
from dpo_cli.data.batches import make_batches, tokenize_examples, training_data
from dpo_cli.engine import loop, rundir
from dpo_cli.engine.backends import SingleProcess
from dpo_cli.errors import RunStopped
from dpo_cli.logging import RunLogger, read_metrics
from dpo_cli.models import tiny_tokenizer
from dpo_cli.objective import make_objective
from tests.conftest import gqa_llama


def _cfg(tmp_path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "stage=sft",
                "model=tiny",
                "logger=none",
                "run_name=loop",
                f"output_root={tmp_path}",
                "eval.num_prompts=0",
                "lr=1e-2",
                "trainer.lr_warmup_steps=0",
                "trainer.batch_size_examples=4",
                "trainer.microbatch_size_examples=2",
                "trainer.max_steps=4",
                "trainer.eval_every_steps=2",
                *overrides,
            ],
        )
    GlobalHydra.instance().clear()
    return cfg


def _train(cfg, run_dir, *, objective=None, model=None):
    """One in-process run of the loop on 16 SFT sequences; returns (model, metrics, microbatches used)."""
    tokenizer = tiny_tokenizer()
    texts = [(f"Q{i}:", [f" answer {i % 3}"]) for i in range(16)]
    examples = tokenize_examples(texts, tokenizer, max_prompt_length_tokens=8, max_length_tokens=24)
    run = rundir.prepare(cfg, run_dir)
    model = model or gqa_llama()
    eval_batches = make_batches(examples[:4], 2, tokenizer.pad_token_id)
    data = training_data(cfg, examples, eval_batches, tokenizer.pad_token_id, start_step=run.start_step)
    used = []
    counted = data.batches
    data.batches = (used.append(1) or b for b in counted)
    logger = RunLogger(cfg, run_dir)
    try:
        loop.train(cfg, run, SingleProcess(cfg, model, tokenizer, run.device), data, objective or
                   make_objective(cfg.loss, cfg.beta), None, logger)  # fmt: skip
    finally:
        logger.close()
    return model, read_metrics(run_dir), len(used)


def test_the_loop_steps_accumulates_logs_and_evaluates(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    before = gqa_llama()
    model, metrics, used = _train(cfg, run_dir)
    assert used == 4 * 2  # 4 steps of 2 micro-batches
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert [m["step"] for m in evals] == [0, 2, 4]  # step 0, every 2 steps, the end
    assert [m["train/examples"] for m in train] == [4, 8, 12, 16]
    assert all(m["train/lr"] == pytest.approx(1e-2) for m in train)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # it learns the three answers
    assert (run_dir / "final" / "config.json").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True))


def test_a_non_finite_loss_skips_its_update_or_stops_the_run(tmp_path):
    calls = itertools.count()

    def objective_nan_on_step_2(model, batch):
        loss, metrics = make_objective(cfg.loss, cfg.beta)(model, batch)
        n = next(calls)
        # Training micro-batches 2 and 3 (step 2) follow the 2 eval batches of step 0.
        return (loss * float("nan") if n in (4, 5) else loss), metrics

    cfg = _cfg(
        tmp_path, "trainer.nan_policy=skip_batch", "trainer.max_steps=3", "trainer.eval_every_steps=10"
    )
    _, metrics, _ = _train(cfg, tmp_path / "skip", objective=objective_nan_on_step_2)
    skipped = {m["step"]: m["train/skipped_batches"] for m in metrics if "train/skipped_batches" in m}
    assert skipped == {1: 0, 2: 1, 3: 1}

    calls = itertools.count()
    cfg = _cfg(tmp_path, "trainer.max_steps=3", "trainer.eval_every_steps=10")
    with pytest.raises(RunStopped, match="step 2: the loss is not finite"):
        _train(cfg, tmp_path / "stop", objective=objective_nan_on_step_2)


def test_resume_from_a_checkpoint_ends_bit_identical(tmp_path):
    straight, _, _ = _train(_cfg(tmp_path), tmp_path / "straight")

    cfg = _cfg(tmp_path, "trainer.save_every_steps=2")
    calls = itertools.count()

    def stop_in_step_3(model, batch):
        # Eval at step 0 (2 batches), steps 1 and 2 (2 each), eval at step 2 (2), then step 3.
        if next(calls) == 2 + 2 * 2 + 2:
            raise RunStopped("stopped in step 3")
        return make_objective(cfg.loss, cfg.beta)(model, batch)

    with pytest.raises(RunStopped, match="stopped in step 3"):
        _train(cfg, tmp_path / "halves", objective=stop_in_step_3)
    assert [p.name for p in (tmp_path / "halves" / "checkpoints").iterdir()] == ["step-2"]
    resumed, metrics, used = _train(
        _cfg(tmp_path, "trainer.save_every_steps=2", "resume=true"), tmp_path / "halves"
    )
    assert used == 2 * 2  # steps 3 and 4 only
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_an_update_whose_clipped_gradients_are_not_finite_is_not_applied(tmp_path):
    """Clipping with a NaN bound (say, validation bypassed) keeps the norm finite and makes every gradient
    NaN: the backend refuses the update instead of writing NaN weights."""
    from omegaconf import open_dict

    cfg = _cfg(tmp_path)
    with open_dict(cfg):
        cfg.trainer.max_grad_norm = float("nan")
    model = gqa_llama()
    backend = SingleProcess(cfg, model, tiny_tokenizer(), torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    grad_norm = backend.step(apply=True)
    assert torch.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
