"""Reward functions: (prompts, completions) -> one float per completion, higher is better."""

from __future__ import annotations

from collections.abc import Callable

from dpo_cli.config import ConfigError, RewardConfig

RewardFn = Callable[[list[str], list[str]], list[float]]


def vader_reward() -> RewardFn:
    """VADER compound sentiment in [-1, 1] of the whole review (prompt + completion), as the paper's
    classifier scores whole reviews; offline and deterministic."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [
            analyzer.polarity_scores(p + c)["compound"] for p, c in zip(prompts, completions, strict=True)
        ]

    return score


def make_reward_fn(cfg: RewardConfig) -> RewardFn:
    if cfg.name == "vader":
        return vader_reward()
    raise ConfigError(f"reward.name={cfg.name}: only `vader` is available")
