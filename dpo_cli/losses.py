"""Preference and baseline losses as pure functions of log-probabilities, and the registry that names them.

Sequence log-probs are sums over completion tokens (see ``dpo_cli.logps``). Equation numbers refer to
Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
unless stated otherwise. Every loss returns per-example values (B,) except ``sft_loss``; the caller
reduces, so that pair weights or gradient accumulation stay its choice.

``LOSSES`` (at the end) maps each `loss=NAME` to its function and to what it needs: which examples
(pairs, rankings, sequences), whether it reads the reference, whether it needs per-token log-probs, and
which `loss.*` hyperparameters it takes. A stage looks its loss up there; adding a loss is one function
and one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_cli.logps import token_logps

PREFERENCE_LOSS_TYPES = ("dpo", "ipo", "cdpo")

# Lower bound on 1 - p(token) in the unlikelihood term: a token the policy is certain of would otherwise
# give -log(0) = inf, and the clamp also stops the gradient there instead of making it infinite.
_UNLIKELIHOOD_MIN_ONE_MINUS_P = 1e-6


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise preference loss for a batch of (y_w, y_l) pairs; all inputs (B,) sequence log-probs.

    With h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)):

    - ``dpo``: -log sigmoid(beta * h), the DPO objective (Eq. 7).
    - ``cdpo``: conservative DPO (Mitchell 2023), the DPO loss against preference labels flipped with
      probability eps = ``label_smoothing`` in [0, 0.5):
      -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).
    - ``ipo``: (h - 1 / (2 * beta))^2 (Azar et al. 2023, "A General Theoretical Paradigm to Understand
      Learning from Human Preferences", Eq. 17), with beta in the role of their tau. h is NOT scaled by
      beta here: IPO regresses the raw log-ratio gap onto the target 1 / (2 * tau).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,). The rewards are the implicit rewards
        r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Sec. 5), detached: they are for logging only.
    """
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {PREFERENCE_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0 (it scales the implicit reward; 0 disables learning)")
    if loss_type == "cdpo":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5) for loss_type='cdpo'")
    elif label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} only applies to loss_type='cdpo' (conservative DPO); "
            f"use loss_type='cdpo' or set label_smoothing=0 for loss_type={loss_type!r}"
        )

    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios

    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        # logsigmoid rather than log(sigmoid(.)): sigmoid underflows to 0 for large negative margins.
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)

    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO under the Plackett-Luce model for a full ranking of K completions (App. A.3, Eq. 20).

    With r_k = beta * (log pi(y_k) - log pi_ref(y_k)) and the completions ordered best first:
    loss = -sum_{k=1..K} [r_k - log sum_{j=k..K} exp(r_j)]. For K = 2 this is exactly the DPO loss.

    Args:
        policy_logps, ref_logps: (B, K) sequence log-probs, column 0 the best completion.
        beta: reward scale, > 0.
        mask: optional (B, K) bool, False for completions absent from a shorter ranking. A masked
            completion contributes neither its own term nor to any denominator, so a ranking of K' < K
            valid completions gives the K'-way loss.

    Returns:
        (B,) losses.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 2:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} "
            "must both be (B, K)"
        )
    rewards = beta * (policy_logps - ref_logps)
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    # The most negative finite value, not -inf: exp(x - lse) is then exactly 0 for masked entries in both
    # forward and backward, whereas -inf would make logcumsumexp's backward compute exp(-inf - -inf) = NaN.
    neg = torch.finfo(rewards.dtype).min
    masked_rewards = torch.where(mask, rewards, torch.full_like(rewards, neg))
    # log sum_{j>=k} exp(r_j) for every k at once: a log-cumsum-exp over the reversed ranking. Done in log
    # space because exp(r) overflows for beta * log-ratios of a few hundred nats.
    log_denominators = torch.logcumsumexp(masked_rewards.flip(-1), dim=-1).flip(-1)
    terms = masked_rewards - log_denominators
    return -torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token-level negative log-likelihood over label tokens (labels != -100), a scalar.

    The standard causal-LM loss (logits at t predict labels at t+1), used by the SFT stage; equal to
    ``F.cross_entropy`` on the shifted, flattened tensors with ``ignore_index=-100``, except that a batch
    with no label tokens gives 0 instead of NaN. Computed in float32.
    """
    per_token, mask = token_logps(logits, labels)
    return -per_token.sum() / mask.sum().clamp(min=1)


def unlikelihood_loss_from_token_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alpha: float,
) -> torch.Tensor:
    """Unlikelihood baseline (Welleck et al. 2019, as used in the DPO paper's Sec. 6) per pair, (B,).

    loss = -log p(y_w|x) + alpha * sum_{t in y_l} -log(1 - p(y_l,t | x, y_l,<t)):
    maximum likelihood on the chosen completion plus a token-level penalty on the rejected one.

    Args:
        chosen_token_logps, rejected_token_logps: (B, T) per-token log-probs (see ``logps.token_logps``).
        chosen_mask, rejected_mask: (B, T) bool, True at completion tokens.
        alpha: weight of the unlikelihood term, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (the unlikelihood term's weight)")
    nll_chosen = -torch.where(chosen_mask, chosen_token_logps, torch.zeros_like(chosen_token_logps)).sum(-1)
    # log(1 - p) = log(-expm1(log p)): 1 - exp(log p) cancels catastrophically as p -> 1, exactly the
    # tokens the penalty is about, while expm1 keeps full precision there.
    one_minus_p = (-torch.expm1(rejected_token_logps)).clamp(min=_UNLIKELIHOOD_MIN_ONE_MINUS_P)
    unlikelihood = -torch.log(one_minus_p)
    unlikelihood = torch.where(rejected_mask, unlikelihood, torch.zeros_like(unlikelihood)).sum(-1)
    return nll_chosen + alpha * unlikelihood


def unlikelihood_loss(
    policy_chosen_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    rejected_labels: torch.Tensor,
    *,
    alpha: float,
) -> torch.Tensor:
    """Unlikelihood loss (B,) from logits (B, T, V) and labels (B, T) with -100 outside the completion.

    See ``unlikelihood_loss_from_token_logps`` for the formula.
    """
    chosen_token_logps, chosen_mask = token_logps(policy_chosen_logits, chosen_labels)
    rejected_token_logps, rejected_mask = token_logps(policy_rejected_logits, rejected_labels)
    return unlikelihood_loss_from_token_logps(
        chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask, alpha=alpha
    )


def preferred_ft_loss(policy_chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Preferred-FT baseline (Sec. 6): SFT on the chosen completions y_w only, per pair (B,).

    The per-token negative log-likelihood -log pi(y_w|x) / |y_w|, i.e. the SFT loss on y_w normalised per
    sequence; the rejected completion and the reference model play no part. A zero token count is treated
    as 1 so an empty completion gives 0, not NaN.
    """
    return -policy_chosen_logps / chosen_num_tokens.clamp(min=1).to(policy_chosen_logps.dtype)


@dataclass(frozen=True)
class Completions:
    """What every registered loss sees: the log-probs of each example's completions, best first.

    `logps`, `valid` and `num_tokens` are (B, K); `valid` is False where a shorter ranking is padded.
    `token_logps` and `token_mask` (B, K, T) are there for token-level losses only.
    """

    logps: torch.Tensor
    valid: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None

    @classmethod
    def gather(
        cls,
        per_token: torch.Tensor,
        mask: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor,
        *,
        token_level: bool = False,
    ) -> Completions:
        """Per-example completions from a batch's unique rows (paper App. B): `per_token`, `mask` (N, T)
        of the rows; `index`, `valid` (B, K), the row of each example's k-th completion."""
        sequence = (per_token * mask).sum(-1)
        return cls(
            logps=sequence[index],
            valid=valid,
            num_tokens=mask.sum(-1)[index],
            token_logps=per_token[index] if token_level else None,
            token_mask=mask[index] if token_level else None,
        )


# (per-example losses (B,), chosen rewards (B,), rejected rewards (B,)); rewards None without a reference.
LossOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def implicit_rewards(
    policy: Completions, reference: torch.Tensor | None, beta: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """beta * (log pi - log pi_ref) of each example's best and worst completion (Sec. 5), detached: the
    scale every method's runs are compared on, whatever the loss."""
    if reference is None:
        return None, None
    rows = torch.arange(len(policy.logps), device=policy.logps.device)
    last = policy.valid.sum(-1) - 1
    chosen = (beta * (policy.logps[:, 0] - reference[:, 0])).detach()
    rejected = (beta * (policy.logps[rows, last] - reference[rows, last])).detach()
    return chosen, rejected


def _pairwise(loss_type: str) -> Callable[..., LossOutput]:
    def loss(policy: Completions, reference: torch.Tensor, *, beta: float, **hyperparameters) -> LossOutput:
        return preference_loss(
            policy.logps[:, 0],
            policy.logps[:, 1],
            reference[:, 0],
            reference[:, 1],
            loss_type=loss_type,
            beta=beta,
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
    """pairs (chosen, rejected) | rankings (K completions, best first) | sequences (SFT)."""
    uses_reference: bool
    """The loss reads reference log-probs (the implicit-reward metrics do whenever one is loaded)."""
    token_level: bool = False
    """The loss needs per-token log-probs (`Completions.token_logps`)."""
    hyperparameters: tuple[str, ...] = ()
    """`loss.*` keys passed to `fn`, besides the top-level `beta`."""
    reduce: Callable[[torch.Tensor, Completions], torch.Tensor] = lambda losses, policy: losses.mean()
    """The batch's scalar loss from the per-example losses: their mean unless the loss says otherwise."""


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(_sft, "sequences", uses_reference=False, reduce=_per_token_mean),
    "dpo": LossSpec(_pairwise("dpo"), "pairs", uses_reference=True),
    "ipo": LossSpec(_pairwise("ipo"), "pairs", uses_reference=True),
    "cdpo": LossSpec(_pairwise("cdpo"), "pairs", uses_reference=True, hyperparameters=("label_smoothing",)),
    "preferred_ft": LossSpec(_preferred_ft, "pairs", uses_reference=False),
    "unlikelihood": LossSpec(
        _unlikelihood, "pairs", uses_reference=False, token_level=True, hyperparameters=("alpha",)
    ),
    "plackett_luce": LossSpec(_plackett_luce, "rankings", uses_reference=True),
}
