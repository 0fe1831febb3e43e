"""Losses beyond pairs of log-probs: rankings (Plackett-Luce), unpaired examples (KTO), and the
likelihood baselines (SFT, Preferred-FT, Unlikelihood), as pure functions.

Sequence log-probs are sums over completion tokens (see ``dpo_cli.logps``). Equation numbers refer to
Rafailov et al. 2023 unless stated otherwise. Every loss returns per-example values (B,) except
``sft_loss``; the caller reduces, so that weights and gradient accumulation stay its choice.
"""

from __future__ import annotations

import torch

from dpo_cli.logps import token_logps

# Lower bound on 1 - p(token) in the unlikelihood term: a token the policy is certain of would otherwise
# give -log(0) = inf, and the clamp also stops the gradient there instead of making it infinite.
_UNLIKELIHOOD_MIN_ONE_MINUS_P = 1e-6


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


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    kl: torch.Tensor | float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8) on
    unpaired examples, (B,).

    With rho = log pi(y|x) - log pi_ref(y|x) and the reference point z0 = `kl` (a detached estimate of
    KL(pi || pi_ref) >= 0, which the caller makes from mismatched prompt/completion pairs):
    desirable y: lambda_D (1 - sigmoid(beta (rho - z0))); undesirable y: lambda_U (1 - sigmoid(beta (z0 -
    rho))), lambda_D = `desirable_weight`, lambda_U = `undesirable_weight`.

    Args:
        policy_logps, ref_logps: (B,) sequence log-probs of each example's completion.
        desirable: (B,) bool, True for desirable examples.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable_weight={desirable_weight}, undesirable_weight={undesirable_weight}: >= 0"
        )
    rho = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (rho - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rho)))
    return torch.where(desirable, desirable_losses, undesirable_losses)
