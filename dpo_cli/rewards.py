"""Reward functions: (prompts, completions) -> one float per completion, higher is better.

Both score the whole text (prompt + completion), as the paper's sentiment classifier scores whole reviews;
a conversation's text is its messages' contents (`chat.plain_text`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_cli.config import RewardConfig
from dpo_cli.data.chat import Text, plain_text
from dpo_cli.errors import ConfigError

RewardFn = Callable[[list[str], list[str]], list[float]]


def vader_reward() -> RewardFn:
    """VADER compound sentiment in [-1, 1]; offline and deterministic."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [
            analyzer.polarity_scores(p + c)["compound"] for p, c in zip(prompts, completions, strict=True)
        ]

    return score


def hf_classifier_reward(cfg: RewardConfig, device: torch.device) -> RewardFn:
    """Probability in [0, 1] of `cfg.label` under a Hugging Face sequence classifier (the paper's ground
    truth: siebert/sentiment-roberta-large-english, label POSITIVE), batched on `device`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model_name_or_path).to(device).eval()
    except OSError as err:
        raise ConfigError(
            f"reward.model_name_or_path={cfg.model_name_or_path}: cannot load a classifier "
            f"({str(err).splitlines()[0]}); offline, point it at a local directory"
        ) from err
    labels = model.config.label2id
    if cfg.label not in labels:
        raise ConfigError(f"reward.label={cfg.label}: the classifier's labels are {', '.join(labels)}")
    label_id = labels[cfg.label]

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), cfg.batch_size):
            enc = tokenizer(
                texts[start : start + cfg.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=cfg.max_length_tokens,
            ).to(device)
            scores += model(**enc).logits.float().softmax(-1)[:, label_id].tolist()
        return scores

    return score


def make_reward_fn(cfg: RewardConfig, device: torch.device | None = None) -> RewardFn:
    if cfg.name == "vader":
        score = vader_reward()
    elif cfg.name == "hf_classifier":
        score = hf_classifier_reward(cfg, device or torch.device("cpu"))
    else:
        raise ConfigError(f"reward.name={cfg.name}: choose vader or hf_classifier")

    def on_text(prompts: list[Text], completions: list[Text]) -> list[float]:
        return score([plain_text(p) for p in prompts], [plain_text(c) for c in completions])

    return on_text
