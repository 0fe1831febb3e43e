"""`dpo-run dpo`: preference optimisation from the SFT checkpoint, which is also the frozen reference.

The recipe: look the loss up in `losses.LOSSES`, find the SFT checkpoint, read the loss's view of the data
(pairs, rankings or unpaired examples), load the policy, score the reference once (`ref.precompute`) if
the loss or its metrics read it, then train.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from dpo_cli import adapters
from dpo_cli.data import Example, pair_view, ranked_view, unpaired_view
from dpo_cli.data.batches import (
    RefTable,
    TokenizedExample,
    fit_batch_to_data,
    make_batches,
    training_data,
    visited_examples,
)
from dpo_cli.data.tokenized import tokenized_splits
from dpo_cli.engine import loop, rundir
from dpo_cli.engine.backends import backend_class
from dpo_cli.evaluate import make_frontier
from dpo_cli.logging import RunLogger
from dpo_cli.losses import LOSSES
from dpo_cli.models import load_model, load_tokenizer
from dpo_cli.objective import make_objective
from dpo_cli.reference import (
    cache_dir_for,
    precomputed_table,
    score_sequences,
    unique_sequences,
)


def data_view(cfg: DictConfig) -> Callable[[list[dict]], list[Example]]:
    """The view of the records that the loss trains on: pairs, rankings or unpaired examples."""
    views = {
        "pairs": partial(pair_view, min_reward_gap=cfg.data.min_reward_gap),
        "rankings": ranked_view,
        "unpaired": unpaired_view,
    }
    return views[LOSSES[cfg.loss.name].examples]


def run(cfg: DictConfig, run_dir: Path) -> None:
    spec = LOSSES[cfg.loss.name]
    sft_dir = rundir.find_sft_checkpoint(cfg)
    # Before the weights load: bad data fails fast, and cached data skips the records.
    tokenizer = load_tokenizer(cfg.model, checkpoint=sft_dir)
    train, held_out, eval_records = tokenized_splits(cfg.data, data_view(cfg), tokenizer)
    fit_batch_to_data(cfg, len(train))
    run = rundir.prepare(cfg, run_dir)
    origin = rundir.provenance(cfg, policy_init=sft_dir, reference=sft_dir)
    trained = origin["reference"]["trained_on"]
    print(
        f"dpo: policy init and reference = {sft_dir} (sha256 {origin['reference']['fingerprint'][:12]}"
        + (f", trained on data {rundir.describe_data(trained['data'])})" if trained else ")")
    )
    quantization = adapters.quantization(cfg)
    policy, _ = load_model(
        cfg.model, seed=cfg.seed, checkpoint=sft_dir, quantization=quantization, tokenizer=tokenizer
    )
    policy.to(run.device)
    if adapters.wanted(cfg):
        policy = adapters.wrap(policy, cfg)
    print(f"dpo: {len(train)} training and {len(held_out)} held-out examples (loss={cfg.loss.name})")
    Backend = backend_class(cfg)

    def load_reference():
        if adapters.wanted(cfg):  # the SFT model is the policy with its adapter off: nothing to load
            return adapters.ReferenceView(policy)
        model, _ = load_model(cfg.model, seed=cfg.seed, checkpoint=sft_dir)
        return Backend.frozen(cfg, model, run.device)  # ZeRO-3: sharded over the ranks

    # The reference is frozen, so its log-probs of the held-out batches are computed once (not at every
    # eval point), and with ref.precompute those of the training data too: then it is loaded only to
    # score a cache miss or to measure the KL of samples at the frontier's eval points. A reference-free
    # loss (spec.reference == "none") never scores it; the frontier's KL still needs it.
    scored = spec.reference != "none"
    online = scored and not cfg.ref.precompute
    ref_model = load_reference() if online or cfg.eval.num_prompts else None
    cache = None
    if cfg.ref.precompute:
        numerics = f"{cfg.model.dtype}|{run.device.type}|{cfg.trainer.engine}"
        numerics += "|nf4" if cfg.peft.name == "qlora" else ""  # the 4-bit base scores differently
        cache = cache_dir_for(Path(cfg.ref.cache_dir), origin["reference"]["fingerprint"], numerics)
    ref_table = None
    if scored:
        reference = (lambda: ref_model) if ref_model is not None else load_reference
        ref_table = _reference_table(
            cfg, reference, train, held_out, tokenizer.pad_token_id, run.device, cache
        )
    pad, share = tokenizer.pad_token_id, cfg.trainer.share_prompts
    eval_batches = make_batches(
        held_out, cfg.trainer.microbatch_size_examples, pad, ref_table, share_prompts=share
    )
    data = training_data(
        cfg,
        train,
        eval_batches,
        pad,
        start_step=run.start_step,
        ref_logps=None if online else ref_table,
        share_prompts=share,
    )

    logger = RunLogger(cfg, run_dir, origin)
    frontier = (
        None
        if ref_model is None
        else make_frontier(cfg, eval_records, tokenizer, ref_model, run_dir, reference_point_dir=cache)
    )
    load_base = lambda: load_model(cfg.model, seed=cfg.seed, checkpoint=sft_dir)[0]  # noqa: E731
    backend = Backend(cfg, policy, tokenizer, run.device, load_base=load_base, num_steps=data.num_steps)
    objective = make_objective(cfg.loss, cfg.beta, ref_model if online else None)
    loop.train(cfg, run, backend, data, objective, frontier, logger)
    logger.close()
    rundir.finish(run_dir, "dpo-run -m dpo beta=0.05,0.1,1,5", "a beta sweep traces the reward/KL frontier")


def _reference_table(
    cfg: DictConfig,
    reference: Callable[[], torch.nn.Module],
    train: Sequence[TokenizedExample],
    held_out: Sequence[TokenizedExample],
    pad_token_id: int,
    device: torch.device,
    cache: Path | None,
) -> RefTable:
    """log pi_ref of every unique sequence the run looks up: with ref.precompute the training sequences
    (in data order) and the held-out ones, read from `cache` or scored once by `reference()` and added to
    it; otherwise the held-out ones only (the training batches are then scored online)."""
    share = cfg.trainer.share_prompts
    if cfg.ref.precompute:
        return precomputed_table(
            reference,
            itertools.chain(visited_examples(train, cfg), held_out),
            directory=cache,
            pad_token_id=pad_token_id,
            device=device,
            share_prompts=share,
        )
    sequences = unique_sequences(held_out)
    logps = score_sequences(reference(), sequences, pad_token_id, device, share_prompts=share)
    return RefTable.of(sequences, logps.tolist())
