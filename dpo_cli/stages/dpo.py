"""`dpo-run dpo`: preference optimisation from the SFT checkpoint, which is also the frozen reference.

Every loss sees the same quantities: per-sequence log-probs of the policy and of the reference for each
example's completions, gathered by index from the batch's unique sequences (paper App. B).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_cli import engine
from dpo_cli.config import PREFERENCE_LOSSES, LossConfig
from dpo_cli.data import example_splits, pair_view, ranked_view
from dpo_cli.data.batches import make_batches, tokenize_splits
from dpo_cli.errors import ConfigError
from dpo_cli.evaluate import make_frontier
from dpo_cli.logging import RunLogger
from dpo_cli.logps import model_token_logps
from dpo_cli.losses import (
    plackett_luce_loss,
    preference_loss,
    preferred_ft_loss,
    unlikelihood_loss_from_token_logps,
)
from dpo_cli.models import load_model
from dpo_cli.reference import (
    cache_dir_for,
    checkpoint_fingerprint,
    precomputed_table,
    score_sequences,
    unique_sequences,
)


def find_sft_checkpoint(cfg: DictConfig) -> Path:
    """The newest SFT `final/` of this experiment trained from the same model preset."""
    if cfg.sft_checkpoint:
        return Path(cfg.sft_checkpoint)
    sft_root = Path(cfg.output_root) / cfg.exp_name / "sft"
    candidates = [
        final
        for final in sft_root.rglob("final")
        if (final / "config.json").is_file()
        and (final.parent / "config.yaml").is_file()
        and OmegaConf.load(final.parent / "config.yaml").model.name == cfg.model.name
    ]
    if not candidates:
        raise ConfigError(
            f"no SFT checkpoint for model={cfg.model.name} under {sft_root}: run `dpo-run sft"
            f"{'' if cfg.exp_name == 'default' else ' exp_name=' + cfg.exp_name} model={cfg.model.name}` "
            "first, or set sft_checkpoint=/path/to/checkpoint"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


@torch.no_grad()
def reference_logps(ref_model, batch: engine.Batch) -> torch.Tensor:
    """(N,) log-probs of the batch's unique sequences under the frozen reference."""
    per_token, mask = model_token_logps(ref_model, batch)
    return (per_token * mask).sum(-1)


def make_loss_fn(loss_cfg: LossConfig, ref_model) -> engine.LossFn:
    """Batches carry `ref_logps` when the reference was precomputed; otherwise `ref_model` scores them."""

    def loss_fn(policy, batch: engine.Batch) -> tuple[torch.Tensor, dict[str, float]]:
        precomputed = "ref_logps" in batch
        # The reference first: its forward's scratch memory is reused, not stacked on the policy's
        # activations, which the policy forward keeps until backward.
        ref_sequence = batch["ref_logps"] if precomputed else reference_logps(ref_model, batch)
        per_token, mask = model_token_logps(policy, batch)
        loss, metrics = objective(loss_cfg, batch, per_token, mask, ref_sequence)
        # Sequences through a model per example: TRL's pairwise path runs 2 policy + 2 reference.
        forward_sequences = len(batch["input_ids"]) * (1 if precomputed else 2)
        return loss, metrics | {"forward_sequences_per_pair": forward_sequences / len(batch["index"])}

    return loss_fn


def objective(
    loss_cfg: LossConfig,
    batch: engine.Batch,
    per_token: torch.Tensor,
    mask: torch.Tensor,
    ref_sequence: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss and metrics of a batch from its policy per-token and reference sequence log-probs."""
    sequence = (per_token * mask).sum(-1)
    index, valid = batch["index"], batch["index_mask"]
    logps, ref_logps = sequence[index], ref_sequence[index]  # (B, K), best first
    chosen, rejected = index[:, 0], index[:, 1]
    last = valid.sum(-1) - 1  # the worst completion of each ranking

    name = loss_cfg.name
    if name in PREFERENCE_LOSSES:
        losses, _, _ = preference_loss(
            logps[:, 0],
            logps[:, 1],
            ref_logps[:, 0],
            ref_logps[:, 1],
            loss_type=name,
            beta=loss_cfg.beta,
            label_smoothing=loss_cfg.label_smoothing,
        )
    elif name == "plackett_luce":
        losses = plackett_luce_loss(logps, ref_logps, beta=loss_cfg.beta, mask=valid)
    elif name == "preferred_ft":
        losses = preferred_ft_loss(logps[:, 0], mask[chosen].sum(-1))
    elif name == "unlikelihood":
        losses = unlikelihood_loss_from_token_logps(
            per_token[chosen], mask[chosen], per_token[rejected], mask[rejected], alpha=loss_cfg.alpha
        )
    else:
        raise ConfigError(f"loss={name} is not a preference loss")

    # Implicit rewards beta * log(pi / ref) of the best and the worst completion, whatever the loss,
    # so every method's runs can be compared on the same scale.
    rows = torch.arange(len(index), device=index.device)
    chosen_rewards = (loss_cfg.beta * (logps[:, 0] - ref_logps[:, 0])).detach()
    rejected_rewards = (loss_cfg.beta * (logps[rows, last] - ref_logps[rows, last])).detach()
    return losses.mean(), {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": logps[:, 0].mean().item(),
        "logps/rejected": logps[rows, last].mean().item(),
    }


def run(cfg: DictConfig, run_dir: Path) -> None:
    sft_dir = find_sft_checkpoint(cfg)
    view = (
        ranked_view
        if cfg.loss.name == "plackett_luce"
        else lambda r: pair_view(r, min_reward_gap=cfg.data.min_reward_gap)
    )
    *splits, eval_records = example_splits(cfg.data, view)
    device = engine.prepare_run(cfg, run_dir)
    print(f"dpo: policy init and reference = {sft_dir}")
    policy, tokenizer = load_model(cfg.model, seed=cfg.seed, checkpoint=sft_dir)
    policy.to(device)
    train, held_out = tokenize_splits(splits, tokenizer, cfg.data)
    print(f"dpo: {len(train)} training and {len(held_out)} held-out examples (loss={cfg.loss.name})")

    def load_reference():
        model, _ = load_model(cfg.model, seed=cfg.seed, checkpoint=sft_dir)
        return engine.frozen_reference(cfg, model, device)  # ZeRO-3: sharded over the ranks

    # The reference is frozen, so its log-probs of the held-out batches are computed once (not at every
    # eval point), and with ref.precompute those of the training data too: then it is loaded only to
    # score a cache miss or to measure the KL of samples at the frontier's eval points.
    pad, share = tokenizer.pad_token_id, cfg.trainer.share_prompts
    ref_model = load_reference() if not cfg.ref.precompute or cfg.eval.num_prompts else None
    if cfg.ref.precompute:
        numerics = f"{cfg.model.dtype}|{device.type}|{cfg.trainer.engine}"
        cache = cache_dir_for(Path(cfg.ref.cache_dir), checkpoint_fingerprint(sft_dir), numerics)
        ref_table = precomputed_table(
            lambda: ref_model if ref_model is not None else load_reference(),
            engine.visited_examples(train, cfg) + held_out,
            directory=cache,
            pad_token_id=pad,
            device=device,
            share_prompts=share,
        )
    else:
        sequences = unique_sequences(held_out)
        logps = score_sequences(ref_model, sequences, pad, device, share_prompts=share)
        ref_table = dict(zip(sequences, logps.tolist(), strict=True))
    eval_batches = make_batches(
        held_out, cfg.trainer.microbatch_size_examples, pad, ref_table, share_prompts=share
    )

    loss_fn = make_loss_fn(cfg.loss, ref_model)
    logger = RunLogger(cfg, run_dir)
    frontier = None if ref_model is None else make_frontier(cfg, eval_records, tokenizer, ref_model, run_dir)
    if frontier is not None and cfg.ref.precompute:
        # The policy starts as the reference: its step-0 point is the same in every job of a sweep.
        setup = OmegaConf.to_container(cfg.eval) | {"reward": OmegaConf.to_container(cfg.reward)}
        key = hashlib.sha256(json.dumps([setup, frontier.prompts], sort_keys=True).encode()).hexdigest()
        frontier.reference_point_file = cache / f"frontier-{key[:24]}.pt"
    engine.train(
        cfg,
        run_dir,
        policy,
        tokenizer,
        train,
        eval_batches,
        loss_fn,
        frontier,
        logger,
        device,
        ref_logps=ref_table if cfg.ref.precompute else None,
        share_prompts=share,
    )
    logger.close()
    engine.finish(run_dir, "dpo-run -m dpo beta=0.05,0.1,1,5", "a beta sweep traces the reward/KL frontier")
