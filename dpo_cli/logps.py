"""Log-probabilities of label tokens under a causal LM's logits.

DPO (Rafailov et al. 2023, Eq. 7) scores a completion y by log pi(y|x) = sum_t log pi(y_t | x, y_<t): a
SUM over the completion's tokens, with prompt and padding tokens excluded (labelled -100).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
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


def model_sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) log pi(completion | prompt) of the batch's unique sequences under `model`, summed over the
    completion's tokens (`model_token_logps`, the one scoring path: chunked head, shared prompts)."""
    per_token, mask = model_token_logps(model, batch)
    return (per_token * mask).sum(-1)


# Attention implementations with a variable-length kernel: they take sequences packed end to end, their
# boundaries read from position_ids, and no mask (a 4-D mask would rule them out).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def padding_free_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The rows of a right-padded batch laid end to end in one row, padding dropped: `packed_input_ids` and
    `packed_position_ids` (1, N), the positions restarting at 0 where each sequence starts, so that
    attention sees each sequence alone; `label_source` as in `data.batches.shared_prompt_layout`: for every
    label token in the row-major order of `labels[:, 1:] != -100`, the packed position that predicts it."""
    keep = attention_mask.bool()
    position_ids = keep.long().cumsum(-1) - 1
    packed_position = (keep.flatten().long().cumsum(0) - 1).view(keep.shape)
    return {
        "packed_input_ids": input_ids[keep].unsqueeze(0),
        "packed_position_ids": position_ids[keep].unsqueeze(0),
        "label_source": packed_position[:, :-1][labels[:, 1:] != IGNORE_INDEX],
    }


def model_token_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunk_bytes: int = 32 * 2**20,
    padding_free: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` of a batch under `model`, without the (B, T, V) logits.

    The LM head runs only on positions that predict a label (prompt and padding positions need no
    logits: in the sentiment task that is a third of them), in blocks of at most `chunk_bytes` of fp32
    logits (170 positions for SmolLM2's 49k vocabulary); no block is kept for backward, which recomputes
    it (`_ChunkedHeadLogps`, the idea of Liger Kernel's fused linear cross-entropy). Models
    whose logits are not a plain linear head of the last hidden state (a DeepSpeed engine, logit scaling
    or soft-capping) take the plain path.

    A batch collated with `share_prompts` runs its shared-prompt layout (each prompt once, its
    completions after it) on models whose attention takes a 4-D mask (sdpa, eager). Under FlashAttention
    (`padding_free=None`: `VARLEN_ATTENTION`) the sequences run packed end to end without padding instead
    (`padding_free_layout`; prompts are not shared then). The result is laid out by sequence, as
    `labels`, in every layout.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    attention = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if padding_free is None:
        padding_free = attention in VARLEN_ATTENTION
    shared = not padding_free and "label_source" in batch and shares_prompts(model, batch)
    label_source = batch["label_source"] if shared else None
    if padding_free:
        packed = padding_free_layout(batch["input_ids"], batch["attention_mask"], batch["labels"])
        label_source = packed["label_source"]
        # No cache: transformers reads packed sequences from position_ids only without one.
        inputs = {
            "input_ids": packed["packed_input_ids"],
            "position_ids": packed["packed_position_ids"],
            "use_cache": False,
        }
    elif shared:
        inputs = {
            "input_ids": batch["shared_input_ids"],
            "position_ids": batch["shared_position_ids"],
            "attention_mask": _attention_mask(module, batch["prompt_attention"]),
        }
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    transformer, adapter_state = _transformer(model)
    head = transformer.get_output_embeddings() if transformer is not None else None
    config = getattr(transformer, "config", None)
    plain = (
        head is None
        or not isinstance(head, torch.nn.Linear)
        # A ZeRO-3 partitioned weight is gathered only inside its module's own forward.
        or hasattr(head.weight, "ds_id")
        or getattr(config, "final_logit_softcapping", None)
        or getattr(config, "logit_scale", None)
    )
    # transformers copies each K/V head to all query heads of its group whenever SDPA gets a mask (CUDA's
    # fast kernels lack masked grouped-query attention) and the copies are saved for backward: SmolLM2's
    # 3 K/V heads become 9 in all 30 layers. torch's CPU flash kernel takes a mask with GQA at the same
    # speed, so on the CPU the shared-prompt forward asks for it (an env var transformers reads per call).
    with _masked_gqa_on_cpu(shared and mask.device.type == "cpu"), adapter_state:
        if plain:
            logits = model(**inputs).logits
        else:
            hidden = transformer.base_model(**inputs).last_hidden_state
    if plain:
        if label_source is None:
            return token_logps(logits, batch["labels"])
        # fp32 for the same reason as in token_logps.
        selected_logits = logits.flatten(0, 1)[label_source].float()
        selected = selected_logits.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        selected = selected - torch.logsumexp(selected_logits, dim=-1)
    else:
        gathered = label_source is not None
        selected_hidden = hidden.flatten(0, 1)[label_source] if gathered else hidden[:, :-1][mask]
        rows = max(1, chunk_bytes // (4 * head.out_features))
        selected = _ChunkedHeadLogps.apply(selected_hidden, head.weight, head.bias, labels[mask], rows)
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return per_token.masked_scatter(mask, selected), mask


def shares_prompts(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether `model` scores the shared-prompt layout exactly. Its attention must take a 4-D mask (sdpa,
    eager; not flash attention), and, checked once per model on the first batch it scores, the layout's
    log-probs must equal those of the same batch's plain rows: a family whose attention or positions
    ignore the layout falls back to one row per sequence, and says so once."""
    module = getattr(model, "module", model)
    known = getattr(module, "_shares_prompts", None)
    if known is None:
        attention = getattr(getattr(module, "config", None), "_attn_implementation", None)
        known = attention in ("sdpa", "eager") and _layouts_agree(model, batch)
        module._shares_prompts = known
        if not known:
            print(
                f"logps: {type(module).__name__} ({attention} attention) cannot score the shared-prompt "
                "layout exactly; its sequences run one row each (trainer.share_prompts has no effect)"
            )
    return known


@torch.no_grad()
def _layouts_agree(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    module._shares_prompts = True  # score the layout itself once
    try:
        shared, mask = model_token_logps(model, batch)
        plain, _ = model_token_logps(model, {k: v for k, v in batch.items() if k != "label_source"})
    finally:
        module.train(was_training)
    tolerance = 1e-3 if shared.dtype == torch.float32 and module.dtype == torch.float32 else 5e-2
    return bool(((shared - plain).abs() * mask).max() <= tolerance)


def _attention_mask(module: torch.nn.Module, visible: torch.Tensor) -> torch.Tensor:
    """The (R, 1, T, T) boolean layout as the model's attention takes it: eager attention adds the mask
    to its scores (0 where visible, the dtype's minimum elsewhere); sdpa takes booleans."""
    if module.config._attn_implementation != "eager":
        return visible
    return torch.zeros(visible.shape, dtype=module.dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(module.dtype).min
    )


def _transformer(model: torch.nn.Module) -> tuple[PreTrainedModel | None, contextlib.AbstractContextManager]:
    """The Hugging Face model whose decoder and LM head `model` runs, and the context to run them in:
    a plain model itself; a PEFT model's base model (its LoRA layers in place); a `ReferenceView`'s, with
    the adapter disabled. None for what only runs as a whole (a DeepSpeed engine)."""
    if isinstance(model, PreTrainedModel):
        return model, contextlib.nullcontext()
    if hasattr(model, "disabled"):  # adapters.ReferenceView
        return model.transformer(), model.disabled()
    if hasattr(model, "module"):  # a DeepSpeed engine: its forward does the ZeRO bookkeeping
        return None, contextlib.nullcontext()
    if hasattr(model, "get_base_model") and isinstance(model.get_base_model(), PreTrainedModel):  # PeftModel
        return model.get_base_model(), contextlib.nullcontext()
    return None, contextlib.nullcontext()


@contextlib.contextmanager
def _masked_gqa_on_cpu(wanted: bool) -> Iterator[None]:
    """TRANSFORMERS_SDPA_FORCE_GQA=1 for one forward when `wanted`, the variable restored afterwards."""
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if not wanted:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _block_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # fp32 for the same reason as in token_logps.
    return torch.nn.functional.linear(hidden, weight, bias).float()


class _ChunkedHeadLogps(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[label] per row, `rows` rows of logits at a time.

    Forward keeps no logits; backward recomputes each block and writes its share of the weight's
    gradient into one (V, H) buffer (addmm_), so a block costs one (rows, V) tensor and no per-block
    (V, H) gradient. d logp / d logits = onehot(label) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int):
        out = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(labels), rows):
            logits = _block_logits(hidden[start : start + rows], weight, bias)
            y = labels[start : start + rows].unsqueeze(-1)
            out[start : start + rows] = logits.gather(-1, y).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for start in range(0, len(labels), ctx.rows):
            block = slice(start, start + ctx.rows)
            logits = _block_logits(hidden[block], weight, bias)
            grad_logits = torch.softmax(logits, dim=-1).mul_(-grad_out[block].unsqueeze(-1))
            grad_logits.scatter_add_(-1, labels[block].unsqueeze(-1), grad_out[block].unsqueeze(-1))
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[block] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), hidden[block])
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None
