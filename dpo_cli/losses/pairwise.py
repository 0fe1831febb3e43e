"""Pairwise preference losses: pure functions of the (y_w, y_l) log-probs of a batch of pairs.

Each loss takes `Pairs` (sequence log-probs summed over completion tokens, (B,)) and beta, returns (B,)
per-pair losses, and says in its docstring which paper and equation it implements. `preference_loss` is
the public entry point (the loss by name, checks, the optional SFT term, the rewards). Notation:
rho = log pi(y) - log pi_ref(y), h = rho_w - rho_l; equation numbers without a paper are Rafailov et al.
2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Pairs:
    """A batch of (y_w, y_l) pairs, everything (B,): the policy's and the reference's sequence log-probs
    (the reference None for reference-free losses) and the completions' lengths in tokens."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None

    @property
    def chosen_logratio(self) -> torch.Tensor:
        """rho_w = log pi(y_w) - log pi_ref(y_w)."""
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)) = rho_w - rho_l."""
        return (self.chosen - self.rejected) - (self.ref_chosen - self.ref_rejected)

    def per_token(self, logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return logps / tokens.clamp(min=1).to(logps.dtype)


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): the logistic loss against labels flipped with
    probability eps. logsigmoid, not log(sigmoid): sigmoid underflows to 0 for large negative margins."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, precise at both ends (Maechler 2012): expm1 near 0, log1p far below."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo(p: Pairs, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta h). With label_smoothing = eps > 0 this is
    conservative DPO, cDPO (Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return _smoothed_sigmoid(beta * p.margin, label_smoothing)


def ipo(p: Pairs, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17): (h - 1 / (2 beta))^2, beta in the role of their tau. h is NOT scaled by beta:
    IPO regresses the raw log-ratio gap onto 1 / (2 tau). h is made of log-probs summed over tokens, as in
    the paper; TRL divides each by its completion's length first, so its h is ~length times smaller and a
    beta tuned there wants to be ~length times smaller here (the target 1 / (2 beta) grows with it)."""
    return (p.margin - 1.0 / (2.0 * beta)) ** 2


def hinge(p: Pairs, beta: float) -> torch.Tensor:
    """SLiC's hinge loss (Zhao et al. 2023, "SLiC-HF", Eq. 2 with delta = 1/beta): max(0, 1 - beta h)."""
    return torch.relu(1 - beta * p.margin)


def robust(p: Pairs, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8), unbiased under labels flipped
    with probability eps: [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)."""
    eps, x = label_smoothing, beta * p.margin
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def exo_pair(p: Pairs, beta: float, label_smoothing: float = 1e-3) -> torch.Tensor:
    """EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16,
    K = 2): KL(q || p) between q = (sigmoid(beta h), sigmoid(-beta h)) and the labels' distribution
    p = (1 - eps, eps), eps = label_smoothing > 0."""
    eps, x = label_smoothing, beta * p.margin
    chosen_term = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
    return chosen_term + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))


def nca_pair(p: Pairs, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    Eq. 12, K = 2) on r = beta rho: -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)."""
    r_w, r_l = beta * p.chosen_logratio, beta * p.rejected_logratio
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair(p: Pairs, beta: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", Eq. 6, the reward shift delta
    left at 0, as TRL's bco_pair): -log sigmoid(beta rho_w) - log sigmoid(-beta rho_l)."""
    return -F.logsigmoid(beta * p.chosen_logratio) - F.logsigmoid(-beta * p.rejected_logratio)


def sppo_hard(p: Pairs, beta: float) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7, P(y_w > y_l)
    = 1): (rho_w - 1 / (2 beta))^2 + (rho_l + 1 / (2 beta))^2."""
    return (p.chosen_logratio - 0.5 / beta) ** 2 + (p.rejected_logratio + 0.5 / beta) ** 2


def aot(p: Pairs, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", Eq. 9): the policy's and the reference's log-ratio gaps log pi(y_w) - log pi(y_l) are each
    sorted over the batch, and the DPO (cDPO) loss is applied to the sorted differences: the policy's gap
    distribution must dominate the reference's (first-order stochastic dominance)."""
    policy_sorted = torch.sort(p.chosen - p.rejected).values
    ref_sorted = torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_sigmoid(beta * (policy_sorted - ref_sorted), label_smoothing)


def aot_unpaired(p: Pairs, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024, Eq. 8): rho_w and rho_l each sorted over the batch; the chosen
    log-ratios' distribution must dominate the rejected ones'."""
    delta = torch.sort(p.chosen_logratio).values - torch.sort(p.rejected_logratio).values
    return _smoothed_sigmoid(beta * delta, label_smoothing)


def apo_zero(p: Pairs, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7): raise y_w's and
    lower y_l's likelihood, each anchored at the reference: (1 - sigmoid(beta rho_w)) + sigmoid(beta rho_l).
    For data whose chosen completions are better than the model's own."""
    return (1 - torch.sigmoid(beta * p.chosen_logratio)) + torch.sigmoid(beta * p.rejected_logratio)


def apo_down(p: Pairs, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both, y_l more: sigmoid(beta rho_w) +
    (1 - sigmoid(beta (rho_w - rho_l))). For data whose chosen completions are worse than the model's."""
    rho_w = p.chosen_logratio
    return torch.sigmoid(beta * rho_w) + (1 - torch.sigmoid(beta * (rho_w - p.rejected_logratio)))


def discopop(p: Pairs, beta: float, discopop_tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP (Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models", Eq. 5), the log-ratio modulated loss: with x = beta h and m = sigmoid(x / tau),
    (1 - m) (-log sigmoid(x)) + m exp(-x)."""
    x = beta * p.margin
    m = torch.sigmoid(x / discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


def sigmoid_norm(p: Pairs, beta: float) -> torch.Tensor:
    """DPO on per-token log-ratios (TRL's sigmoid_norm; the length normalisation of R-DPO / SimPO applied
    to DPO): -log sigmoid(beta (rho_w / |y_w| - rho_l / |y_l|))."""
    delta = p.per_token(p.chosen_logratio, p.chosen_tokens) - p.per_token(
        p.rejected_logratio, p.rejected_tokens
    )
    return -F.logsigmoid(beta * delta)


def simpo(p: Pairs, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    Eq. 6), no reference: -log sigmoid(beta log pi(y_w) / |y_w| - beta log pi(y_l) / |y_l| - gamma), gamma
    = simpo_gamma the target reward margin (cDPO-style smoothing with label_smoothing, as TRL's CPO)."""
    delta = p.per_token(p.chosen, p.chosen_tokens) - p.per_token(p.rejected, p.rejected_tokens)
    return _smoothed_sigmoid(beta * delta - simpo_gamma, label_smoothing)


def orpo(p: Pairs, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq.
    6-7), no reference: -log P(y_w) - beta log sigmoid(log odds(y_w) - log odds(y_l)), with log P the
    per-token mean log-prob and odds(y) = P(y) / (1 - P(y)); beta is the paper's lambda (TRL's
    ORPOConfig.beta)."""
    mean_w, mean_l = p.per_token(p.chosen, p.chosen_tokens), p.per_token(p.rejected, p.rejected_tokens)
    log_odds = (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))
    return -mean_w - beta * F.logsigmoid(log_odds)


def dpop(p: Pairs, beta: float, dpop_lambda: float = 50.0) -> torch.Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", Eq. 3): -log sigmoid(beta (h - lambda max(0, log pi_ref(y_w) - log pi(y_w)))): DPO, plus a
    penalty whenever the chosen completion becomes less likely than under the reference (plain DPO can
    lower both likelihoods as long as the gap grows)."""
    penalty = torch.relu(p.ref_chosen - p.chosen)
    return -F.logsigmoid(beta * (p.margin - dpop_lambda * penalty))


@dataclass(frozen=True)
class PairwiseLoss:
    fn: Callable[..., torch.Tensor]
    reference: bool = True
    """False: the loss reads no reference log-probs (its rewards are beta * per-token log-probs)."""
    per_token: bool = False
    """The loss needs the completions' lengths (chosen_num_tokens, rejected_num_tokens)."""
    hyperparameters: tuple[str, ...] = ()


PAIRWISE_LOSSES: dict[str, PairwiseLoss] = {
    "dpo": PairwiseLoss(dpo),
    "ipo": PairwiseLoss(ipo),
    "cdpo": PairwiseLoss(dpo, hyperparameters=("label_smoothing",)),
    "hinge": PairwiseLoss(hinge),
    "robust": PairwiseLoss(robust, hyperparameters=("label_smoothing",)),
    "exo_pair": PairwiseLoss(exo_pair, hyperparameters=("label_smoothing",)),
    "nca_pair": PairwiseLoss(nca_pair),
    "bco_pair": PairwiseLoss(bco_pair),
    "sppo_hard": PairwiseLoss(sppo_hard),
    "aot": PairwiseLoss(aot, hyperparameters=("label_smoothing",)),
    "aot_unpaired": PairwiseLoss(aot_unpaired, hyperparameters=("label_smoothing",)),
    "apo_zero": PairwiseLoss(apo_zero),
    "apo_down": PairwiseLoss(apo_down),
    "discopop": PairwiseLoss(discopop, hyperparameters=("discopop_tau",)),
    "sigmoid_norm": PairwiseLoss(sigmoid_norm, per_token=True),
    "simpo": PairwiseLoss(
        simpo, reference=False, per_token=True, hyperparameters=("simpo_gamma", "label_smoothing")
    ),
    "orpo": PairwiseLoss(orpo, reference=False, per_token=True),
    "dpop": PairwiseLoss(dpop, hyperparameters=("dpop_lambda",)),
}
# Hyperparameters a loss does not take must stay at these values (a set one would be silently ignored).
_NEUTRAL = {"label_smoothing": 0.0, "sft_weight": 0.0}


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_type: str = "dpo",
    beta: float = 0.1,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    sft_weight: float = 0.0,
    **hyperparameters: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise preference loss `loss_type` (a key of PAIRWISE_LOSSES; each function's docstring gives
    its paper and equation) for a batch of (y_w, y_l) pairs; all tensors (B,), log-probs summed over the
    completions' tokens. The reference may be None for the reference-free losses (simpo, orpo); the token
    counts are needed by the length-normalised ones (sigmoid_norm, simpo, orpo) and the SFT term.

    `sft_weight` = alpha adds alpha * -log pi(y_w) / |y_w|, the chosen completion's per-token negative
    log-likelihood (RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 2).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,), the rewards detached: the implicit
        rewards beta * (log pi(y) - log pi_ref(y)) (Sec. 5), or for reference-free losses beta * log pi(y)
        / |y|, the reward they optimise.
    """
    spec = PAIRWISE_LOSSES.get(loss_type)
    if spec is None:
        raise ValueError(f"loss_type={loss_type!r} is not one of {tuple(PAIRWISE_LOSSES)}")
    _check_pairwise(spec, loss_type, beta, dict(hyperparameters, sft_weight=sft_weight))
    with_reference = ref_chosen_logps is not None and ref_rejected_logps is not None
    if spec.reference and not with_reference:
        raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs")
    if (spec.per_token or sft_weight or not spec.reference) and (
        chosen_num_tokens is None or rejected_num_tokens is None
    ):
        raise ValueError(
            f"loss_type={loss_type!r} (or sft_weight) needs chosen_num_tokens and rejected_num_tokens"
        )
    pairs = Pairs(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_num_tokens,
        rejected_num_tokens,
    )
    losses = spec.fn(
        pairs, beta, **{k: hyperparameters[k] for k in spec.hyperparameters if k in hyperparameters}
    )
    if sft_weight:
        losses = losses - sft_weight * pairs.per_token(pairs.chosen, pairs.chosen_tokens)
    if spec.reference:
        chosen_rewards = beta * pairs.chosen_logratio.detach()
        rejected_rewards = beta * pairs.rejected_logratio.detach()
    else:
        chosen_rewards = beta * pairs.per_token(pairs.chosen, pairs.chosen_tokens).detach()
        rejected_rewards = beta * pairs.per_token(pairs.rejected, pairs.rejected_tokens).detach()
    return losses, chosen_rewards, rejected_rewards


def _check_pairwise(
    spec: PairwiseLoss, loss_type: str, beta: float, hyperparameters: dict[str, float]
) -> None:
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0 (it scales the implicit reward; 0 disables learning)")
    for key, value in hyperparameters.items():
        takes = [name for name, s in PAIRWISE_LOSSES.items() if key in s.hyperparameters]
        if key != "sft_weight" and key not in spec.hyperparameters and value != _NEUTRAL.get(key, value):
            raise ValueError(
                f"{key}={value} only applies to loss_type in {takes}; set it for one of those or leave it at "
                f"{_NEUTRAL[key]} for loss_type={loss_type!r}"
            )
        if key not in spec.hyperparameters and key not in _NEUTRAL:
            raise ValueError(f"loss_type={loss_type!r} takes no {key}; it takes {spec.hyperparameters}")
    if "label_smoothing" in hyperparameters and "label_smoothing" in spec.hyperparameters:
        ls, exo = hyperparameters["label_smoothing"], loss_type == "exo_pair"
        if not (0.0 < ls < 0.5 if exo else 0.0 <= ls < 0.5):
            interval = "(0, 0.5): EXO takes the log of it" if exo else "[0, 0.5)"
            raise ValueError(f"label_smoothing={ls} must be in {interval} for loss_type={loss_type!r}")
    positive = {"discopop_tau": True, "dpop_lambda": False, "simpo_gamma": False, "sft_weight": False}
    for key, strictly in positive.items():
        value = hyperparameters.get(key, 1.0)
        if value < 0 or (strictly and value == 0):
            raise ValueError(f"{key}={value} must be {'> 0' if strictly else '>= 0'}")
