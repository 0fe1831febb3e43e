"""Batched sampling from a causal LM: left padding, KV cache, one generate() call per batch of prompts."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size_prompts: int = 32,
    seed: int = 0,
    desc: str = "sampling",
) -> list[list[str]]:
    """`num_samples` completions (text after the prompt, special tokens dropped) for every prompt."""
    model.eval()
    device = next(model.parameters()).device
    # Left padding puts every prompt's last token at the same position, so new tokens follow directly.
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completions: list[list[str]] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size_prompts), desc=desc, unit="batch"):
            batch = prompts[start : start + batch_size_prompts]
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            completions.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
    return completions
