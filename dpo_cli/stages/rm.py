"""`dpo-run rm`: a reward model for PPO (paper Sec. 3): the SFT model with a scalar head, trained with the
Bradley-Terry loss (Eq. 2) on the preference pairs; held-out pair accuracy at every eval point.

The model is a transformers sequence-classification model with one label (its `score` head new), read
at each sequence's last token (`rewards.sequence_scores`); its final/ is what `reward=model
reward.path=DIR` and `dpo-run ppo ppo.reward_model_path=DIR` score with.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_cli.data import pair_view
from dpo_cli.data.batches import Batch, fit_batch_to_data, make_batches, training_data
from dpo_cli.data.tokenized import tokenized_splits
from dpo_cli.engine import loop, rundir
from dpo_cli.engine.backends import backend_class
from dpo_cli.errors import ConfigError
from dpo_cli.logging import RunLogger
from dpo_cli.losses.rlhf import bradley_terry_loss
from dpo_cli.models import DTYPES, load_tokenizer
from dpo_cli.rewards import sequence_scores


def bradley_terry_objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 2 on the batch's pairs (each unique sequence scored once, gathered by index, paper App. B)."""
    rewards = sequence_scores(model, batch)[batch["index"]]
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    margins = (chosen - rejected).detach()
    return bradley_terry_loss(chosen, rejected).mean(), {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
    }


def load_reward_model(cfg: DictConfig, checkpoint: Path):
    """The SFT checkpoint as a one-label sequence classifier (its LM head dropped, a new seeded score
    head)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=1, dtype=DTYPES[cfg.model.dtype]
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run(cfg: DictConfig, run_dir: Path) -> None:
    if cfg.peft.name != "none":
        raise ConfigError(
            f"dpo-run rm trains the whole model: peft={cfg.peft.name} is not supported, use peft=none"
        )
    sft_dir = rundir.find_sft_checkpoint(cfg)
    view = partial(pair_view, min_reward_gap=cfg.data.min_reward_gap)
    tokenizer = load_tokenizer(cfg.model, checkpoint=sft_dir)
    train, held_out, _ = tokenized_splits(cfg.data, view, tokenizer)
    fit_batch_to_data(cfg, len(train))
    run = rundir.prepare(cfg, run_dir)
    print(f"rm: reward model init = {sft_dir} with a scalar head")
    model, _ = load_reward_model(cfg, sft_dir)
    model.to(run.device)
    print(f"rm: {len(train)} training and {len(held_out)} held-out pairs")
    pad, micro = tokenizer.pad_token_id, cfg.trainer.microbatch_size_examples
    eval_batches = make_batches(held_out, micro, pad)
    data = training_data(cfg, train, eval_batches, pad, start_step=run.start_step)

    logger = RunLogger(cfg, run_dir)
    backend = backend_class(cfg)(cfg, model, tokenizer, run.device)
    final = loop.train(cfg, run, backend, data, bradley_terry_objective, None, logger)
    logger.close()
    rundir.finish(
        run_dir,
        f"dpo-run ppo ppo.reward_model_path={final}",
        "PPO on this learned reward; eval points still score with reward=",
    )
