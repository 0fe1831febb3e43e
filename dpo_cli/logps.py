"""Log-probabilities of label tokens under a causal LM's logits.

DPO (Rafailov et al. 2023, Eq. 7) scores a completion y by log pi(y|x) = sum_t log pi(y_t | x, y_<t): a
SUM over the completion's tokens, with prompt and padding tokens excluded (labelled -100).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

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


def model_token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` of a batch under `model`, without the (B, T, V) logits.

    The LM head runs only on positions that predict a label (prompt and padding positions need no
    logits: in the sentiment task that is a third of them), `chunk_tokens` rows at a time, so at most one
    (chunk_tokens, V) fp32 block exists at once in the forward pass; with gradients on, each block is
    recomputed in backward (activation checkpointing of the head) instead of being kept alive. Models
    whose logits are not a plain linear head of the last hidden state (a DeepSpeed engine, logit scaling
    or soft-capping) take the plain path.
    """
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    config = getattr(model, "config", None)
    plain = (
        head is None
        or not isinstance(head, torch.nn.Linear)
        or getattr(config, "final_logit_softcapping", None)
        or getattr(config, "logit_scale", None)
    )
    if plain:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logps(logits, batch["labels"])
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    selected_hidden, selected_labels = hidden[:, :-1][mask], labels[mask]
    parts = []
    for start in range(0, len(selected_labels), chunk_tokens):
        h, y = selected_hidden[start : start + chunk_tokens], selected_labels[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logps, head, h, y, use_reentrant=False))
        else:
            parts.append(_head_logps(head, h, y))
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        per_token = per_token.masked_scatter(mask, torch.cat(parts))
    return per_token, mask


def _head_logps(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 for the same reason as in token_logps; logsumexp instead of log_softmax: only the label column
    # of the (N, V) block is needed.
    logits = head(hidden).float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
