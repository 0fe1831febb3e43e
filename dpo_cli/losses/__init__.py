"""Preference and baseline losses (pure functions of log-probabilities) and LOSSES, the registry that
names them.

``LOSSES`` (below) maps each `loss=NAME` to its function and to what it needs: which examples (pairs,
rankings, unpaired, sequences), whether it reads the reference, whether it needs per-token log-probs, and
which `loss.*` hyperparameters it takes. The DPO stage picks its data view and reference from the entry;
`objective.make_objective` calls its function. A new loss is one function (pairwise.py or
beyond_pairs.py) and one entry here; a test checks the registry against conf/loss/*.yaml and the schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpo_cli.losses.beyond_pairs import (
    kto_loss,
    plackett_luce_loss,
    preferred_ft_loss,
    sft_loss,
    unlikelihood_loss,
    unlikelihood_loss_from_token_logps,
)
from dpo_cli.losses.pairwise import PAIRWISE_LOSSES, Pairs, preference_loss

__all__ = [
    "LOSSES",
    "PAIRWISE_LOSSES",
    "Completions",
    "LossSpec",
    "Pairs",
    "kto_loss",
    "plackett_luce_loss",
    "preference_loss",
    "preferred_ft_loss",
    "sft_loss",
    "unlikelihood_loss",
    "unlikelihood_loss_from_token_logps",
]


@dataclass(frozen=True)
class Completions:
    """What every registered loss sees: the log-probs of each example's completions, best first.

    `logps`, `valid` and `num_tokens` are (B, K); `valid` is False where a shorter ranking is padded.
    `token_logps` and `token_mask` (B, K, T) are there for token-level losses only; `desirable` (B,) for
    unpaired examples (KTO: column 0 the example's completion, column 1 another prompt's).
    """

    logps: torch.Tensor
    valid: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    desirable: torch.Tensor | None = None

    def worst(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) `values` (B, K) at each example's worst completion: its last valid one."""
        rows = torch.arange(len(values), device=values.device)
        return values[rows, self.valid.sum(-1) - 1]

    @classmethod
    def gather(cls, per_token: torch.Tensor, mask: torch.Tensor, batch: dict, *, token_level: bool = False):
        """Per-example completions from a batch's unique rows (paper App. B): `per_token`, `mask` (N, T)
        of the rows; the batch's `index`, `index_mask` (B, K), the row of each example's k-th completion."""
        index = batch["index"]
        sequence = (per_token * mask).sum(-1)
        return cls(
            logps=sequence[index],
            valid=batch["index_mask"],
            num_tokens=mask.sum(-1)[index],
            token_logps=per_token[index] if token_level else None,
            token_mask=mask[index] if token_level else None,
            desirable=batch.get("desirable"),
        )


# (per-example losses (B,), chosen rewards, rejected rewards), the rewards detached (B,) each (for KTO:
# those of the desirable and of the undesirable examples); None without a reference.
LossOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def implicit_rewards(
    policy: Completions, reference: torch.Tensor | None, beta: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """beta * (log pi - log pi_ref) of each example's best and worst completion (Sec. 5), detached: the
    scale the paper's baselines are compared on."""
    if reference is None:
        return None, None
    chosen = (beta * (policy.logps[:, 0] - reference[:, 0])).detach()
    rejected = (beta * (policy.worst(policy.logps) - policy.worst(reference))).detach()
    return chosen, rejected


def _pairwise(loss_type: str) -> Callable[..., LossOutput]:
    def loss(
        policy: Completions, reference: torch.Tensor | None, *, beta: float, **hyperparameters
    ) -> LossOutput:
        return preference_loss(
            policy.logps[:, 0],
            policy.logps[:, 1],
            None if reference is None else reference[:, 0],
            None if reference is None else reference[:, 1],
            loss_type=loss_type,
            beta=beta,
            chosen_num_tokens=policy.num_tokens[:, 0],
            rejected_num_tokens=policy.num_tokens[:, 1],
            **hyperparameters,
        )

    return loss


def _plackett_luce(policy: Completions, reference: torch.Tensor, *, beta: float) -> LossOutput:
    losses = plackett_luce_loss(policy.logps, reference, beta=beta, mask=policy.valid)
    return losses, *implicit_rewards(policy, reference, beta)


def _preferred_ft(policy: Completions, reference: torch.Tensor | None, *, beta: float) -> LossOutput:
    losses = preferred_ft_loss(policy.logps[:, 0], policy.num_tokens[:, 0])
    return losses, *implicit_rewards(policy, reference, beta)


def _unlikelihood(
    policy: Completions, reference: torch.Tensor | None, *, beta: float, alpha: float
) -> LossOutput:
    t, m = policy.token_logps, policy.token_mask
    losses = unlikelihood_loss_from_token_logps(t[:, 0], m[:, 0], t[:, 1], m[:, 1], alpha=alpha)
    return losses, *implicit_rewards(policy, reference, beta)


def kto_reference_point(policy: Completions, reference: torch.Tensor) -> torch.Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, Sec. 4.1): the batch's mean log-ratio of mismatched pairs
    (each prompt with another prompt's completion, column 1), an estimate of KL(pi || pi_ref), clamped at
    0 and detached (no gradient flows through the reference point)."""
    return (policy.logps[:, 1] - reference[:, 1]).mean().clamp(min=0).detach()


def _kto(
    policy: Completions,
    reference: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> LossOutput:
    kl = kto_reference_point(policy, reference)
    logps, ref_logps, desirable = policy.logps[:, 0], reference[:, 0], policy.desirable
    losses = kto_loss(
        logps,
        ref_logps,
        desirable,
        beta=beta,
        kl=kl,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    rewards = (beta * (logps - ref_logps)).detach()
    return losses, rewards[desirable], rewards[~desirable]


def _sft(policy: Completions, reference: torch.Tensor | None, *, beta: float) -> LossOutput:
    # The summed negative log-likelihood per sequence; `_per_token_mean` reduces it.
    return -policy.logps[:, 0], None, None


def _per_token_mean(losses: torch.Tensor, policy: Completions) -> torch.Tensor:
    """SFT's reduction: every completion token of the batch weighs the same (as ``sft_loss``)."""
    return losses.sum() / policy.num_tokens[:, 0].sum().clamp(min=1)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: `fn(policy: Completions, reference (B, K) | None, *, beta, **hyperparameters)`
    and what it needs."""

    fn: Callable[..., LossOutput]
    examples: str
    """pairs (chosen, rejected) | rankings (K completions, best first) | unpaired (KTO) | sequences (SFT):
    the view of the data the stage builds."""
    reference: str
    """loss: the loss reads reference log-probs | metrics: only its implicit-reward metrics do (the
    paper's baselines, compared on DPO's reward scale) | none: no reference log-probs at all (the
    reference model is loaded only to measure the frontier's KL)."""
    token_level: bool = False
    """The loss needs per-token log-probs (`Completions.token_logps`)."""
    hyperparameters: tuple[str, ...] = ()
    """`loss.*` keys passed to `fn`, besides the top-level `beta`."""
    reduce: Callable[[torch.Tensor, Completions], torch.Tensor] = lambda losses, policy: losses.mean()
    """The batch's scalar loss from the per-example losses: their mean unless the loss says otherwise."""


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(_sft, "sequences", "none", reduce=_per_token_mean),
    **{
        name: LossSpec(
            _pairwise(name),
            "pairs",
            "loss" if pairwise.reference else "none",
            hyperparameters=(*pairwise.hyperparameters, "sft_weight"),
        )
        for name, pairwise in PAIRWISE_LOSSES.items()
    },
    "preferred_ft": LossSpec(_preferred_ft, "pairs", "metrics"),
    "unlikelihood": LossSpec(_unlikelihood, "pairs", "metrics", token_level=True, hyperparameters=("alpha",)),
    "plackett_luce": LossSpec(_plackett_luce, "rankings", "loss"),
    "kto": LossSpec(_kto, "unpaired", "loss", hyperparameters=("desirable_weight", "undesirable_weight")),
}
