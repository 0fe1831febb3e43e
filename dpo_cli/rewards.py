"""Reward functions: (prompts, completions) -> one float per completion, higher is better.

Each scores the whole text (prompt + completion), as the paper's sentiment classifier scores whole
reviews; for VADER and classifiers a conversation's text is its messages' contents (`chat.plain_text`), a
`dpo-run rm` model reads the tokens it was trained on (chat template included).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def sequence_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) a reward model's scalar for each unique row of a collated batch (right-padded): its score head
    on the hidden state of the row's last token (the attention mask's last 1), so the pad token may be
    EOS, as it is for models that have no pad token of their own."""
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    if hasattr(model, "get_base_model"):  # a PEFT model: its adapted model, LoRA layers in place
        model = model.get_base_model()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden = model.base_model(**inputs).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def learned_reward(path: str | Path, device: torch.device, batch_size: int = 32) -> RewardFn:
    """The score of a reward model written by `dpo-run rm` (a sequence-classification model with one
    label), on prompt + completion tokenized as it was trained (`tokenize_examples`: EOS appended)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpo_cli.data.batches import collate, tokenize_examples

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{path}: not a reward model dir (no config.json); point at a `dpo-run rm` final/")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    if model.config.num_labels != 1:
        raise ConfigError(f"{path}: a classifier with {model.config.num_labels} labels, not a reward model")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def score(prompts: list[Text], completions: list[str]) -> list[float]:
        examples = tokenize_examples(
            [(p, [c]) for p, c in zip(prompts, completions, strict=True)],
            tokenizer,
            max_prompt_length_tokens=256,
            max_length_tokens=512,
        )
        scores: list[float] = []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad).items()}
            scores += sequence_scores(model, batch)[batch["index"][:, 0]].tolist()
        return scores

    return score


def make_reward_fn(cfg: RewardConfig, device: torch.device | None = None) -> RewardFn:
    if cfg.name == "model":
        return learned_reward(cfg.path, device or torch.device("cpu"), cfg.batch_size)
    if cfg.name == "vader":
        score = vader_reward()
    elif cfg.name == "hf_classifier":
        score = hf_classifier_reward(cfg, device or torch.device("cpu"))
    else:
        raise ConfigError(f"reward.name={cfg.name}: choose vader, hf_classifier or model")

    def on_text(prompts: list[Text], completions: list[Text]) -> list[float]:
        return score([plain_text(p) for p in prompts], [plain_text(c) for c in completions])

    return on_text
