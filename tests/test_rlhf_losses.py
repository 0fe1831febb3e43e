"""Hand-derived checks of the RLHF pieces (dpo_cli/losses/rlhf.py): Bradley-Terry, KL-penalised rewards,
GAE, PPO's clipped policy and value losses, whitening and RLOO's leave-one-out baseline."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from dpo_cli.losses.rlhf import (
    bradley_terry_loss,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)


def test_bradley_terry_loss_hand_derived():
    """-log sigmoid(r_w - r_l): margin 1 -> log(1 + e^-1); margin 0 -> log 2; margin -2 -> log(1 + e^2)."""
    losses = bradley_terry_loss(torch.tensor([1.0, 0.5, -1.0]), torch.tensor([0.0, 0.5, 1.0]))
    assert_close(losses, torch.tensor([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(2))]))


def test_kl_penalized_rewards_put_the_score_on_the_last_completion_token():
    """beta = 0.5. Row 0: log-ratios (-1 - -1.5, -2 - -1) = (0.5, -1) -> (-0.25, 0.5), score 1 on the last
    token -> (-0.25, 1.5). Row 1 has one token: log-ratio 0 -> 0, plus its score 2; padding stays 0."""
    rewards = kl_penalized_rewards(
        torch.tensor([1.0, 2.0]),
        logps=torch.tensor([[-1.0, -2.0], [-3.0, -9.0]]),
        ref_logps=torch.tensor([[-1.5, -1.0], [-3.0, 4.0]]),
        mask=torch.tensor([[True, True], [True, False]]),
        beta=0.5,
    )
    assert_close(rewards, torch.tensor([[-0.25, 1.5], [2.0, 0.0]]))


def test_gae_hand_derived():
    """gamma = 0.9, lam = 0.5 (gamma * lam = 0.45); V after the last token is 0.

    Row 0: r = (0, 0, 1), V = (0.5, 0.5, 0.5):
        delta_2 = 1 - 0.5 = 0.5,            A_2 = 0.5
        delta_1 = 0.9 * 0.5 - 0.5 = -0.05,  A_1 = -0.05 + 0.45 * 0.5 = 0.175
        delta_0 = -0.05,                    A_0 = -0.05 + 0.45 * 0.175 = 0.02875
        returns = A + V = (0.52875, 0.675, 1.0)
    Row 1: two tokens, then padding (whose r = 5 and V = 7 must not leak in): r = (0, 2), V = (1, 1):
        delta_1 = 2 - 1 = 1,                A_1 = 1
        delta_0 = 0.9 * 1 - 1 = -0.1,       A_0 = -0.1 + 0.45 * 1 = 0.35
        returns = (1.35, 2.0, 0)
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert_close(advantages, torch.tensor([[0.02875, 0.175, 0.5], [0.35, 1.0, 0.0]]))
    assert_close(returns, torch.tensor([[0.52875, 0.675, 1.0], [1.35, 2.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_the_return_minus_the_value():
    """gamma = lam = 1: A_t = sum_{l >= t} r_l - V_t (Monte Carlo advantage), returns = reward to go."""
    rewards, values = torch.tensor([[1.0, -2.0, 4.0]]), torch.tensor([[0.3, -0.1, 2.0]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert_close(returns, torch.tensor([[3.0, 2.0, 4.0]]))
    assert_close(advantages, torch.tensor([[2.7, 2.1, 2.0]]))


def test_ppo_policy_loss_clips_only_in_the_direction_the_advantage_pushes():
    """eps = 0.2, old log-probs 0, ratios (1.5, 1.5, 0.5, 0.5), advantages (1, -1, 1, -1):
        token 0: max(-1.5, -1.2) = -1.2  (clipped: rho > 1 + eps with A > 0, no gradient)
        token 1: max( 1.5,  1.2) =  1.5  (unclipped)
        token 2: max(-0.5, -0.8) = -0.5  (unclipped)
        token 3: max( 0.5,  0.8) =  0.8  (clipped: rho < 1 - eps with A < 0, no gradient)
    loss = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15, clipfrac = 2/4; approx_kl = mean((rho - 1) - log rho)
    = ((0.5 - log 1.5) * 2 + (-0.5 - log 0.5) * 2) / 4. d loss / d log pi_t = -A_t rho_t / 4 where unclipped:
    (0, 1.5, -0.5, 0) / 4; token 4 is padding and counts nowhere."""
    logps = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 9.0])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 3.0])
    mask = torch.tensor([True, True, True, True, False])
    loss, stats = ppo_policy_loss(logps, torch.zeros(5), advantages, mask, cliprange=0.2)
    assert_close(loss, torch.tensor(0.15))
    assert_close(stats["clipfrac"], torch.tensor(0.5))
    expected_kl = ((0.5 - math.log(1.5)) * 2 + (-0.5 - math.log(0.5)) * 2) / 4
    assert_close(stats["approx_kl"], torch.tensor(expected_kl))
    loss.backward()
    assert_close(logps.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, 0.0]) / 4)


def test_ppo_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    """c = 0.2, V_old = 1: token 0: V = 2 clips to 1.2; errors (2 - 3)^2 = 1 and (1.2 - 3)^2 = 3.24 -> 3.24.
    token 1: V = 0 clips to 0.8; errors (0 - 1.05)^2 = 1.1025 and (0.8 - 1.05)^2 = 0.0625 -> 1.1025.
    loss = 0.5 * (3.24 + 1.1025) / 2 = 1.085625, clipped share 1/2."""
    loss, clipfrac = ppo_value_loss(
        torch.tensor([2.0, 0.0]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([3.0, 1.05]),
        torch.tensor([True, True]),
        cliprange_value=0.2,
    )
    assert_close(loss, torch.tensor(1.085625))
    assert_close(clipfrac, torch.tensor(0.5))


def test_whiten_uses_the_masked_entries_only():
    """(1, 2, 3) and padding: mean 2, variance 2/3 -> (-1, 0, 1) / sqrt(2/3); padding 0."""
    mask = torch.tensor([True, True, True, False])
    out = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), mask)
    s = math.sqrt(2 / 3)
    assert_close(out, torch.tensor([-1 / s, 0.0, 1 / s, 0.0]), atol=1e-6, rtol=1e-6)
    assert_close(whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), mask, shift_mean=False)[1], torch.tensor(2.0))


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    """Rewards (1, 2, 3): baselines (2 + 3) / 2 = 2.5, (1 + 3) / 2 = 2, (1 + 2) / 2 = 1.5."""
    assert_close(rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[-1.5, 0.0, 1.5]]))
    # With K = 2 each sample's baseline is the other one.
    assert_close(rloo_advantages(torch.tensor([[4.0, 1.0]])), torch.tensor([[3.0, -3.0]]))
