"""A stage's objective: `(model, batch) -> (loss, metrics)`, built from a registered loss.

Every loss sees the same quantities: per-sequence (and, when it asks, per-token) log-probs of the policy
and of the reference for each example's completions, gathered by index from the batch's unique sequences
(paper App. B). The reference's come precomputed in the batch (`ref_logps`, `ref.precompute=true`) or from
scoring it here; the policy's from `logps.model_token_logps`, the one scoring path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from dpo_cli.data.batches import Batch
from dpo_cli.logps import model_sequence_logps, model_token_logps
from dpo_cli.losses import LOSSES, Completions, kto_reference_point

Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def make_objective(loss_cfg: DictConfig, beta: float, reference: torch.nn.Module | None = None) -> Objective:
    """The objective of `loss=<loss_cfg.name>`; `reference` scores the batches that carry no
    precomputed `ref_logps` (None, with no `ref_logps` either: no reference, as in SFT or SimPO)."""
    spec = LOSSES[loss_cfg.name]
    hyperparameters = {key: loss_cfg[key] for key in spec.hyperparameters}
    metrics_of = METRICS[spec.examples]

    def objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        # The reference first: its forward's scratch memory is reused, not stacked on the policy's
        # activations, which the policy forward keeps until backward.
        ref_sequence = batch.get("ref_logps")
        if ref_sequence is None and reference is not None:
            with torch.no_grad():
                ref_sequence = model_sequence_logps(reference, batch)
        per_token, mask = model_token_logps(model, batch)
        policy = Completions.gather(per_token, mask, batch, token_level=spec.token_level)
        ref = None if ref_sequence is None else ref_sequence[batch["index"]]
        losses, chosen_rewards, rejected_rewards = spec.fn(policy, ref, beta=beta, **hyperparameters)
        # Sequences through a model per example: TRL's pairwise path runs 2 policy + 2 reference.
        through_models = 2 if reference is not None and "ref_logps" not in batch else 1
        forward_sequences = len(batch["input_ids"]) * through_models / len(batch["index"])
        metrics = metrics_of(policy, ref, chosen_rewards, rejected_rewards, forward_sequences)
        return spec.reduce(losses, policy), metrics

    return objective


def _preference_metrics(policy: Completions, ref, chosen_rewards, rejected_rewards, forward_sequences):
    """The paper's code's metrics: implicit rewards of the best and worst completion, their log-probs."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": policy.logps[:, 0].mean().item(),
        "logps/rejected": policy.worst(policy.logps).mean().item(),
        "forward_sequences_per_pair": forward_sequences,
    }


def _unpaired_metrics(policy: Completions, ref, chosen_rewards, rejected_rewards, forward_sequences):
    """KTO: the implicit rewards of the desirable and of the undesirable examples, and z0, the KL estimate
    of the batch's mismatched pairs; a class absent from the batch counts 0."""
    desirable = policy.desirable

    def mean(values: torch.Tensor) -> float:
        return values.mean().item() if len(values) else 0.0

    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(chosen_rewards) - mean(rejected_rewards),
        "logps/chosen": mean(policy.logps[desirable, 0]),
        "logps/rejected": mean(policy.logps[~desirable, 0]),
        "kto_z0": kto_reference_point(policy, ref).item(),
        "desirable_fraction": desirable.float().mean().item(),
        "forward_sequences_per_pair": forward_sequences,
    }


def _sequence_metrics(policy: Completions, *_) -> dict[str, float]:
    logps, num_tokens = policy.logps[:, 0], policy.num_tokens[:, 0]
    return {
        "logps/completion": logps.mean().item(),
        "logps/per_token": (logps.sum() / num_tokens.sum()).item(),
        "length_tokens": num_tokens.float().mean().item(),
    }


METRICS = {
    "pairs": _preference_metrics,
    "rankings": _preference_metrics,
    "unpaired": _unpaired_metrics,
    "sequences": _sequence_metrics,
}
