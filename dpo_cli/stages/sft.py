"""`dpo-run sft`: supervised fine-tuning on the data's SFT view (the reference model of later stages)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig

from dpo_cli import engine
from dpo_cli.data import example_splits, sft_view
from dpo_cli.data.batches import make_batches, tokenize_splits
from dpo_cli.evaluate import make_frontier
from dpo_cli.logging import RunLogger
from dpo_cli.logps import token_logps
from dpo_cli.losses import sft_loss
from dpo_cli.models import load_model


def sft_loss_fn(model, batch: engine.Batch) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token, mask = token_logps(logits, batch["labels"])
    num_tokens = mask.sum(-1)
    return sft_loss(logits, batch["labels"]), {
        "logps/completion": (per_token * mask).sum(-1).mean().item(),
        "logps/per_token": ((per_token * mask).sum() / num_tokens.sum()).item(),
        "length_tokens": num_tokens.float().mean().item(),
    }


def run(cfg: DictConfig, run_dir: Path) -> None:
    *splits, eval_records = example_splits(cfg.data, sft_view)
    device = engine.prepare_run(cfg, run_dir)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    model.to(device)
    # The frontier's KL is measured against the model SFT starts from, kept frozen.
    initial_model = (
        engine.frozen_reference(cfg, copy.deepcopy(model), device) if cfg.eval.num_prompts else None
    )

    train, held_out = tokenize_splits(splits, tokenizer, cfg.data)
    print(f"sft: {len(train)} training and {len(held_out)} held-out sequences")
    eval_batches = make_batches(held_out, cfg.trainer.microbatch_size_examples, tokenizer.pad_token_id)

    logger = RunLogger(cfg, run_dir)
    frontier = make_frontier(cfg, eval_records, tokenizer, initial_model, run_dir)
    engine.train(cfg, run_dir, model, tokenizer, train, eval_batches, sft_loss_fn, frontier, logger, device)
    logger.close()
    engine.finish(run_dir, "dpo-run dpo beta=0.1", "finds this SFT checkpoint by experiment and model")
