"""Log-probabilities of label tokens under a causal LM's logits.

DPO (Rafailov et al. 2023, Eq. 7) scores a completion y by log pi(y|x) = sum_t log pi(y_t | x, y_<t): a
SUM over the completion's tokens, with prompt and padding tokens excluded (labelled -100).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels, and which of them count.

    Args:
        logits: (B, T, V) causal-LM logits, any floating dtype.
        labels: (B, T) token ids; -100 marks prompt and padding positions.

    Returns:
        ``(per_token_logps, mask)``, both (B, T-1): ``per_token_logps[:, t]`` is log p(labels[:, t+1]) under
        ``logits[:, t]``, 0.0 (float32) where ``mask`` is False.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    # Logits at position t predict the token at t+1, so the last logit and the first label have no partner.
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # -100 is not a valid index; any in-range id works because its value is discarded below.
    safe_labels = torch.where(mask, labels, 0)
    # fp32 because bf16/fp16 log-softmax over a large vocabulary loses the small differences DPO's
    # log-ratios are made of. log p = logit[label] - logsumexp(logits) avoids keeping a (B, T, V)
    # log-softmax tensor alive for backward when only the label column is needed.
    logits = logits.float()
    selected = torch.gather(logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = selected - torch.logsumexp(logits, dim=-1)
    # where (not multiply) so a non-finite value at a masked position cannot leak into the sum as NaN.
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence: the sum of the label tokens' log-probs (labels != -100), shape (B,).

    This is the quantity inside the DPO loss (Rafailov et al. 2023, Eq. 7); a row with no label tokens
    gives 0.0. Computed in float32 whatever the logits' dtype.
    """
    per_token, _ = token_logps(logits, labels)
    return per_token.sum(dim=-1)
