"""`dpo-run sft`: supervised fine-tuning on the data's SFT view (the reference model of later stages)."""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig

from dpo_cli import adapters
from dpo_cli.data import sft_view
from dpo_cli.data.batches import fit_batch_to_data, make_batches, training_data
from dpo_cli.data.tokenized import tokenized_splits
from dpo_cli.engine import loop, rundir
from dpo_cli.engine.backends import backend_class
from dpo_cli.evaluate import make_frontier
from dpo_cli.logging import RunLogger
from dpo_cli.models import load_model, load_tokenizer
from dpo_cli.objective import make_objective


def run(cfg: DictConfig, run_dir: Path) -> None:
    # Before the weights load: bad data fails fast, and cached data skips the records.
    tokenizer = load_tokenizer(cfg.model)
    train, held_out, eval_records = tokenized_splits(cfg.data, sft_view, tokenizer)
    fit_batch_to_data(cfg, len(train))
    run = rundir.prepare(cfg, run_dir)
    quantization = adapters.quantization(cfg)
    model, _ = load_model(cfg.model, seed=cfg.seed, quantization=quantization, tokenizer=tokenizer)
    Backend = backend_class(cfg)
    # The frontier's KL is measured against the model SFT starts from, kept frozen: under a LoRA adapter
    # that is the model itself with the adapter off; otherwise a copy.
    if adapters.wanted(cfg):
        model = adapters.wrap(model.to(run.device), cfg)
        initial_model = adapters.ReferenceView(model)
    else:
        model.to(run.device)
        initial_model = (
            Backend.frozen(cfg, copy.deepcopy(model), run.device) if cfg.eval.num_prompts else None
        )

    print(f"sft: {len(train)} training and {len(held_out)} held-out sequences")
    eval_batches = make_batches(held_out, cfg.trainer.microbatch_size_examples, tokenizer.pad_token_id)
    data = training_data(cfg, train, eval_batches, tokenizer.pad_token_id, start_step=run.start_step)

    logger = RunLogger(cfg, run_dir, rundir.provenance(cfg, starting_model=None))
    frontier = make_frontier(cfg, eval_records, tokenizer, initial_model, run_dir)
    load_base = lambda: load_model(cfg.model, seed=cfg.seed)[0]  # noqa: E731
    backend = Backend(cfg, model, tokenizer, run.device, load_base=load_base, num_steps=data.num_steps)
    loop.train(cfg, run, backend, data, make_objective(cfg.loss, cfg.beta), frontier, logger)
    logger.close()
    rundir.finish(run_dir, "dpo-run dpo beta=0.1", "finds this SFT checkpoint by experiment and model")
