"""Examples -> token batches: every unique (prompt, completion) sequence of a batch appears once.

A batch holds the unique sequences of its examples (right-padded; labels of prompt and padding tokens are
-100) and `index`, the (B, K) row of each example's k-th completion: the paper's App. B form, so a
completion shared by several pairs (4 samples -> 6 pairs per prompt) is scored once and the pairs are
gathered by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dpo_cli.config import DataConfig
from dpo_cli.data import Example

Sequence = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, completion ids): a batch row's key
RefTable = dict[Sequence, float]  # precomputed reference log-prob of each sequence


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[tuple[int, ...], ...]


def tokenize_examples(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length_tokens: int,
    max_length_tokens: int,
) -> list[TokenizedExample]:
    """Prompts keep their last `max_prompt_length_tokens` tokens; completions end with EOS and are cut
    from the right so that prompt + completion fits `max_length_tokens`, EOS kept."""
    cache: dict[str, list[int]] = {}

    def ids(text: str, special: bool) -> list[int]:
        key = ("S" if special else "N") + text
        if key not in cache:
            cache[key] = tokenizer(text, add_special_tokens=special)["input_ids"]
        return cache[key]

    eos = tokenizer.eos_token_id
    out = []
    long_prompts: set[str] = set()
    for prompt, completions in examples:
        prompt_ids = ids(prompt, True)
        if len(prompt_ids) > max_prompt_length_tokens:
            long_prompts.add(prompt)
            prompt_ids = prompt_ids[-max_prompt_length_tokens:]
        budget = max_length_tokens - len(prompt_ids) - 1
        completion_ids = tuple(tuple(ids(c, False)[:budget] + [eos]) for c in completions)
        out.append(TokenizedExample(tuple(prompt_ids), completion_ids))
    if long_prompts:
        print(
            f"data: {len(long_prompts)} prompt(s) longer than data.max_prompt_length_tokens="
            f"{max_prompt_length_tokens} were cut from the left (their ends kept)"
        )
    return out


def collate(
    examples: list[TokenizedExample],
    pad_token_id: int,
    ref_logps: RefTable | None = None,
) -> dict[str, torch.Tensor]:
    """The batch of `examples`; with `ref_logps` (precomputed reference log-probs by sequence), also
    `ref_logps`, the reference log-prob of each unique row."""
    rows: dict[Sequence, int] = {}
    index = [[rows.setdefault((ex.prompt_ids, c), len(rows)) for c in ex.completion_ids] for ex in examples]
    num_completions = max(len(i) for i in index)
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        labels[row, len(prompt) : n] = torch.tensor(completion)
        attention_mask[row, :n] = 1
    # Ragged K (rankings of different lengths) pads `index` with row 0 and masks it out.
    index_mask = torch.tensor([[k < len(i) for k in range(num_completions)] for i in index])
    index_tensor = torch.tensor([i + [0] * (num_completions - len(i)) for i in index])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": index_tensor,
        "index_mask": index_mask,
    }
    if ref_logps is not None:
        batch["ref_logps"] = torch.tensor([ref_logps[row] for row in rows], dtype=torch.float32)
    return batch


def tokenize_splits(
    splits: tuple[list[Example], list[Example]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Both splits of `example_splits`, tokenized with the data config's length budgets."""
    train, held_out = (
        tokenize_examples(
            examples,
            tokenizer,
            max_prompt_length_tokens=cfg.max_prompt_length_tokens,
            max_length_tokens=cfg.max_length_tokens,
        )
        for examples in splits
    )
    return train, held_out
