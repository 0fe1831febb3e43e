"""Hand-derived checks of the preference and baseline losses.

The batch below is used throughout, with h = (pc - pr) - (rc - rr):
    pair 0: pc=-1, pr=-2, rc=-1.5, rr=-1.5  ->  h = 1 - 0 = 1
    pair 1: pc=-3, pr=-1, rc=-2,   rr=-2    ->  h = -2 - 0 = -2
    pair 2: pc=-4, pr=-6, rc=-4,   rr=-6    ->  h = 2 - 2 = 0
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dpo_cli.logps import sequence_logps, token_logps
from dpo_cli.losses import (
    plackett_luce_loss,
    preference_loss,
    preferred_ft_loss,
    sft_loss,
    unlikelihood_loss,
    unlikelihood_loss_from_token_logps,
)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pc = torch.tensor([-1.0, -3.0, -4.0])
    pr = torch.tensor([-2.0, -1.0, -6.0])
    rc = torch.tensor([-1.5, -2.0, -4.0])
    rr = torch.tensor([-1.5, -2.0, -6.0])
    return pc, pr, rc, rr


def test_dpo_loss_hand_derived() -> None:
    """Eq. 7 with beta = 0.1: loss = -log sigmoid(0.1 h) = log(1 + exp(-0.1 h)).

    h = 1:  log(1 + e^-0.1) = 0.6443966600735709
    h = -2: log(1 + e^0.2)  = 0.7981388693815918
    h = 0:  log 2           = 0.6931471805599453
    """
    losses, _, _ = preference_loss(*_batch(), loss_type="dpo", beta=0.1)
    assert_close(losses, torch.tensor([0.6443966600735709, 0.7981388693815918, 0.6931471805599453]))


def test_cdpo_loss_hand_derived() -> None:
    """cDPO, eps = 0.1, beta = 0.1: (1 - eps) softplus(-x) + eps softplus(x) with x = beta h.

    Since softplus(x) - softplus(-x) = x, this is softplus(-x) + eps x = DPO loss + 0.01 h:
    h = 1:  0.6443966600735709 + 0.01 = 0.6543966600735709
    h = -2: 0.7981388693815918 - 0.02 = 0.7781388693815918
    h = 0:  log 2                     = 0.6931471805599453
    """
    losses, _, _ = preference_loss(*_batch(), loss_type="cdpo", beta=0.1, label_smoothing=0.1)
    assert_close(losses, torch.tensor([0.6543966600735709, 0.7781388693815918, 0.6931471805599453]))


def test_cdpo_with_zero_smoothing_is_dpo() -> None:
    dpo, _, _ = preference_loss(*_batch(), loss_type="dpo", beta=0.1)
    cdpo, _, _ = preference_loss(*_batch(), loss_type="cdpo", beta=0.1, label_smoothing=0.0)
    assert_close(cdpo, dpo)


def test_ipo_loss_hand_derived() -> None:
    """IPO (Azar et al. 2023, Eq. 17), beta = tau = 0.5: (h - 1/(2 * 0.5))^2 = (h - 1)^2, h unscaled.

    h = 1: 0,  h = -2: 9,  h = 0: 1
    """
    losses, _, _ = preference_loss(*_batch(), loss_type="ipo", beta=0.5)
    assert_close(losses, torch.tensor([0.0, 9.0, 1.0]))


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "cdpo"])
def test_rewards_are_scaled_detached_log_ratios(loss_type: str) -> None:
    """chosen = 0.1 (pc - rc) = [0.05, -0.1, 0]; rejected = 0.1 (pr - rr) = [-0.05, 0.1, 0]."""
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in _batch())
    smoothing = 0.1 if loss_type == "cdpo" else 0.0
    losses, chosen, rejected = preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=0.1, label_smoothing=smoothing
    )
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    assert_close(chosen, torch.tensor([0.05, -0.1, 0.0]))
    assert_close(rejected, torch.tensor([-0.05, 0.1, 0.0]))


def test_dpo_gradient_is_the_papers_weighting() -> None:
    """Sec. 4: d loss / d log pi(y_w) = -beta sigmoid(r_l - r_w) and
    d loss / d log pi(y_l) = +beta sigmoid(r_l - r_w).

    With r = beta (log pi - log pi_ref), r_l - r_w = -beta h; checked for random inputs and beta = 0.5.
    """
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(8, generator=gen) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.5
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    weight = torch.sigmoid(rejected_rewards - chosen_rewards)
    assert_close(pc.grad, -beta * weight)
    assert_close(pr.grad, beta * weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, r"loss_type='kto'.*dpo.*ipo.*cdpo"),
        ({"beta": 0.0}, r"beta=0.0 must be > 0"),
        ({"beta": -1.0}, r"beta=-1.0 must be > 0"),
        ({"loss_type": "dpo", "label_smoothing": 0.1}, r"cdpo"),
        ({"loss_type": "cdpo", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "cdpo", "label_smoothing": -0.1}, r"\[0, 0.5\)"),
    ],
)
def test_preference_loss_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preference_loss(*_batch(), **kwargs)


def test_plackett_luce_k2_is_dpo() -> None:
    """Eq. 20 with K = 2: -[r_1 - log(e^r_1 + e^r_2)] - [r_2 - r_2] = -log sigmoid(r_1 - r_2) = Eq. 7."""
    gen = torch.Generator().manual_seed(1)
    policy = -20 * torch.rand(16, 2, generator=gen)
    ref = -20 * torch.rand(16, 2, generator=gen)
    pl = plackett_luce_loss(policy, ref, beta=0.3)
    dpo, _, _ = preference_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    assert_close(pl, dpo)


def test_plackett_luce_k3_hand_derived() -> None:
    """policy = [-1, -2, -3], ref = [-3, -3, -3], beta = 1  ->  r = [2, 1, 0].

    loss = -[2 - log(e^2 + e + 1)] - [1 - log(e + 1)] - [0 - 0]
         = log(1 + e^-1 + e^-2) + log(1 + e^-1) = 0.7208676519626033
    """
    loss = plackett_luce_loss(
        torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-3.0, -3.0, -3.0]]), beta=1.0
    )
    expected = math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + math.exp(-1))
    assert_close(loss, torch.tensor([expected]))
    assert_close(loss, torch.tensor([0.7208676519626033]))


def test_plackett_luce_mask_drops_trailing_completions() -> None:
    """K = 3 with the last completion masked equals K = 2 on the first two, and its inputs get no gradient."""
    gen = torch.Generator().manual_seed(2)
    policy = (-10 * torch.rand(4, 3, generator=gen)).requires_grad_(True)
    ref = -10 * torch.rand(4, 3, generator=gen)
    mask = torch.tensor([[True, True, False]] * 4)
    masked = plackett_luce_loss(policy, ref, beta=0.5, mask=mask)
    assert_close(masked, plackett_luce_loss(policy[:, :2], ref[:, :2], beta=0.5))
    masked.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[:, 2] == 0).all()


def test_plackett_luce_extreme_rewards_are_finite() -> None:
    """exp(r) overflows float32 for r > 88; the log-space cumulative sum must not."""
    loss = plackett_luce_loss(torch.tensor([[0.0, -500.0, -1000.0]]), torch.zeros(1, 3), beta=1.0)
    assert torch.isfinite(loss).all()
    assert_close(loss, torch.tensor([0.0]))


def test_plackett_luce_rejects_bad_beta() -> None:
    with pytest.raises(ValueError, match="beta"):
        plackett_luce_loss(torch.zeros(1, 2), torch.zeros(1, 2), beta=0.0)


def test_sft_loss_is_shifted_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(sft_loss(logits, labels), expected)


def test_sft_loss_with_no_label_tokens_is_zero() -> None:
    loss = sft_loss(torch.randn(2, 4, 5), torch.full((2, 4), -100))
    assert loss.item() == 0.0


def test_unlikelihood_hand_derived_two_tokens() -> None:
    """Chosen tokens p = [1/2, 1/4]: -log p(y_w) = log 2 + log 4 = log 8.
    Rejected tokens p = [1/2, 3/4] (and a masked position with p = 1, which must not count):
    -log(1 - 1/2) - log(1 - 3/4) = log 2 + log 4 = log 8.
    alpha = 0.5: loss = log 8 + 0.5 log 8 = 1.5 log 8 = 3.1191623125197534.
    """
    chosen = torch.log(torch.tensor([[0.5, 0.25]]))
    rejected = torch.log(torch.tensor([[0.5, 0.75, 1.0]]))
    loss = unlikelihood_loss_from_token_logps(
        chosen,
        torch.tensor([[True, True]]),
        rejected,
        torch.tensor([[True, True, False]]),
        alpha=0.5,
    )
    assert_close(loss, torch.tensor([3.1191623125197534]))


def test_unlikelihood_of_a_certain_token_is_finite() -> None:
    """p -> 1 would give -log(0) = inf; the clamp bounds it at -log(1e-6) and keeps the gradient finite."""
    rejected = torch.tensor([[0.0, -1e-9]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = unlikelihood_loss_from_token_logps(torch.zeros(1, 2), mask, rejected, mask, alpha=1.0)
    assert_close(loss, torch.tensor([-2 * math.log(1e-6)]))
    loss.sum().backward()
    assert torch.isfinite(rejected.grad).all()


def test_unlikelihood_with_alpha_zero_is_chosen_nll() -> None:
    gen = torch.Generator().manual_seed(4)
    chosen_logits, rejected_logits = torch.randn(2, 3, 6, 9, generator=gen)
    chosen_labels = torch.randint(0, 9, (3, 6), generator=gen)
    rejected_labels = torch.randint(0, 9, (3, 6), generator=gen)
    chosen_labels[:, :2] = -100
    rejected_labels[:, :2] = -100
    loss = unlikelihood_loss(chosen_logits, chosen_labels, rejected_logits, rejected_labels, alpha=0.0)
    assert_close(loss, -sequence_logps(chosen_logits, chosen_labels))


def test_unlikelihood_from_logits_matches_token_logps_version() -> None:
    gen = torch.Generator().manual_seed(5)
    chosen_logits, rejected_logits = torch.randn(2, 2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[:, 0] = -100
    loss = unlikelihood_loss(chosen_logits, labels, rejected_logits, labels, alpha=0.1)
    c, cm = token_logps(chosen_logits, labels)
    r, rm = token_logps(rejected_logits, labels)
    naive_penalty = -(torch.log1p(-r.exp()) * rm).sum(-1)
    assert_close(loss, -(c * cm).sum(-1) + 0.1 * naive_penalty)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_unlikelihood_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    t = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"alpha=.* must be in \[0, 1\]"):
        unlikelihood_loss_from_token_logps(t, m, t, m, alpha=alpha)


def test_preferred_ft_is_per_token_nll_of_chosen() -> None:
    """log pi(y_w) = [-6, -3, 0] over [3, 2, 0] tokens -> per-token NLL [2, 1.5, 0] (empty -> 0, not NaN)."""
    loss = preferred_ft_loss(torch.tensor([-6.0, -3.0, 0.0]), torch.tensor([3, 2, 0]))
    assert_close(loss, torch.tensor([2.0, 1.5, 0.0]))


# --- The registry: what `loss=NAME` looks up --------------------------------------------------------------


def test_the_registry_matches_the_shipped_loss_files_and_the_schema():
    from dataclasses import fields

    from dpo_cli.config import Loss, LossConfig, conf_dir
    from dpo_cli.losses import LOSSES

    assert set(LOSSES) == {p.stem for p in (conf_dir() / "loss").glob("*.yaml")} == set(Loss)
    keys = {f.name for f in fields(LossConfig)}
    for name, spec in LOSSES.items():
        assert spec.examples in ("pairs", "rankings", "unpaired", "sequences"), name
        assert spec.reference in ("loss", "metrics", "none"), name
        assert set(spec.hyperparameters) <= keys, name
        assert not spec.token_level or spec.examples == "pairs", name


def test_registered_dpo_returns_the_loss_and_the_rewards_of_preference_loss():
    """logps (-1, -2), reference (-1.5, -1.5), beta 1: h = (-1 - -2) - 0 = 1, loss = log(1 + e^-1);
    rewards 1 * (-1 + 1.5) = 0.5 and 1 * (-2 + 1.5) = -0.5."""
    from dpo_cli.losses import LOSSES, Completions

    policy = Completions(
        logps=torch.tensor([[-1.0, -2.0]]),
        valid=torch.ones(1, 2, dtype=torch.bool),
        num_tokens=torch.ones(1, 2),
    )
    losses, chosen, rejected = LOSSES["dpo"].fn(policy, torch.tensor([[-1.5, -1.5]]), beta=1.0)
    assert_close(losses, torch.tensor([math.log(1 + math.exp(-1))]))
    assert_close(chosen, torch.tensor([0.5]))
    assert_close(rejected, torch.tensor([-0.5]))
    assert_close(LOSSES["dpo"].reduce(losses, policy), losses[0])


def test_registered_rewards_use_the_worst_completion_of_a_shorter_ranking():
    """Ranking of 2 valid completions padded to K = 3: the rejected reward is completion 1's, 0.5 *
    (-3 - -1) = -1, not the padding's; the chosen 0.5 * (-1 - -2) = 0.5."""
    from dpo_cli.losses import LOSSES, Completions

    policy = Completions(
        logps=torch.tensor([[-1.0, -3.0, 0.0]]),
        valid=torch.tensor([[True, True, False]]),
        num_tokens=torch.ones(1, 3),
    )
    losses, chosen, rejected = LOSSES["plackett_luce"].fn(policy, torch.tensor([[-2.0, -1.0, 0.0]]), beta=0.5)
    # K' = 2 is DPO: h = (-1 - -3) - (-2 - -1) = 3, loss = log(1 + e^(-0.5 * 3)).
    assert_close(losses, torch.tensor([math.log(1 + math.exp(-1.5))]))
    assert_close(chosen, torch.tensor([0.5]))
    assert_close(rejected, torch.tensor([-1.0]))


def test_registered_sft_weighs_every_completion_token_the_same():
    """Sequences of 3 and 1 tokens with log-probs -3 and -1: (3 + 1) / (3 + 1) = 1 nat per token, where
    the mean over sequences would give (3 + 1) / 2 = 2."""
    from dpo_cli.losses import LOSSES, Completions

    policy = Completions(
        logps=torch.tensor([[-3.0], [-1.0]]),
        valid=torch.ones(2, 1, dtype=torch.bool),
        num_tokens=torch.tensor([[3], [1]]),
    )
    losses, chosen, rejected = LOSSES["sft"].fn(policy, None, beta=0.1)
    assert chosen is None and rejected is None
    assert_close(LOSSES["sft"].reduce(losses, policy), torch.tensor(1.0))
