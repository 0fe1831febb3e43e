"""The RLHF pipeline DPO is compared against (Rafailov et al. 2023, Sec. 3 and Fig. 2): a Bradley-Terry
reward model, then PPO (or RLOO) on the KL-penalised reward, as pure functions of tensors.

Per-token tensors are (B, T) with a bool `mask` (B, T) that is True on a completion's tokens; position t
is the state before the completion's t-th token is drawn (where the policy's log-prob of that token and
the value head's estimate both live). Losses return scalars (masked means) plus detached statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The reward model's negative log-likelihood under Bradley-Terry (paper Eq. 2):
    -log sigmoid(r(x, y_w) - r(x, y_l)), per pair, (B,)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def kl_penalized_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Per-token rewards whose sum is the paper's objective for one sample (Eq. 3):
    r(x, y) - beta * log pi(y|x) / pi_ref(y|x), spread over the completion as in Ziegler et al. 2019:
    every token pays -beta * (log pi(y_t|.) - log pi_ref(y_t|.)) and the last one also gets the score.

    Args:
        scores: (B,) the reward model's (or true reward's) score of each completion.
        logps, ref_logps: (B, T) per-token log-probs of the sampled tokens under the sampling policy and
            under the reference.
        mask: (B, T) the completion's tokens, contiguous from the left (at least one per row).
    Returns:
        (B, T) rewards, 0 outside `mask`.
    """
    rewards = -beta * (logps - ref_logps) * mask
    last = mask.sum(-1) - 1
    return rewards.index_put((torch.arange(len(scores), device=scores.device), last), scores, accumulate=True)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16), per token:
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = sum_l (gamma * lam)^l delta_{t+l},
    computed backwards as A_t = delta_t + gamma * lam * A_{t+1}; the value after the last token is 0 (the
    episode ends there). Returns (advantages, returns = A + V), both (B, T) and 0 outside `mask`."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_advantage
        next_value, next_advantage = values[:, t], advantages[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (the mean added back when not `shift_mean`), 0 outside
    `mask`: PPO's per-batch normalisation of advantages (and, with whiten_rewards, of rewards)."""
    mean = (values * mask).sum() / mask.sum()
    variance = (((values - mean) * mask) ** 2).sum() / mask.sum()
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise:
    mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(a_t|s_t) / pi_old(a_t|s_t),
    eps = `cliprange`. Returns (loss, {"clipfrac": share of tokens where the clipped term is the larger,
    "approx_kl": mean of (rho - 1) - log rho, an estimate of KL(pi_old || pi)}), the statistics detached."""
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).detach(),
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (Schulman et al. 2017's baselines implementation, as in TRL):
    0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2), c = `cliprange_value`.
    Returns (loss, the share of tokens where the clipped error is the larger, detached)."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, Eq. 6; Kool et al. 2019): for K samples
    of one prompt, A_i = r_i - 1/(K-1) * sum_{j != i} r_j = K/(K-1) * (r_i - mean_j r_j).

    Args:
        rewards: (P, K) the sequence-level (KL-penalised) rewards of K >= 2 samples for each of P prompts.
    Returns:
        (P, K) advantages.
    """
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"RLOO needs K >= 2 samples per prompt, got {k}")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
