"""Batched sampling from a causal LM: left padding, KV cache, one generate() call per batch of prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli.data.chat import Text, encode_prompt
from dpo_cli.distributed import synced_generation


@dataclass
class Samples:
    """`num_samples` rows per prompt, prompt-major. Token ids are the exact sampled ones (no re-tokenizing),
    so log-probs of the samples under any model score the very sequences that were drawn."""

    prompts: list[Text]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Text],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size_prompts: int = 32,
    seed: int = 0,
    desc: str = "sampling",
) -> Samples:
    model.eval()
    device = next(model.parameters()).device
    # Left padding puts every prompt's last token at the same position, so new tokens follow directly.
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    rng_state = torch.random.get_rng_state()
    # One fixed seed per call: the same prompts get the same random stream at every eval of every run.
    torch.manual_seed(seed)
    out = Samples([], [], [], [])
    try:
        for start in tqdm(range(0, len(prompts), batch_size_prompts), desc=desc, unit="batch", leave=False):
            batch = prompts[start : start + batch_size_prompts]
            # Encoded as training encodes them (a conversation through the chat template).
            enc = tokenizer.pad(
                {"input_ids": [encode_prompt(tokenizer, p) for p in batch]}, return_tensors="pt"
            ).to(device)
            # temperature 0 is greedy decoding: one deterministic completion per prompt, repeated so the
            # rows keep their prompt-major layout (generate() refuses several greedy return sequences).
            greedy = temperature == 0
            sampling_args = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
            generated = model.generate(
                **enc,
                do_sample=not greedy,
                **sampling_args,
                max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced_generation(model),
            )
            if greedy:
                generated = generated.repeat_interleave(num_samples, dim=0)
            new_tokens = generated[:, enc["input_ids"].shape[1] :].tolist()
            for row, tokens in enumerate(new_tokens):
                prompt_row = row // num_samples
                prompt_ids = enc["input_ids"][prompt_row][enc["attention_mask"][prompt_row].bool()].tolist()
                # Everything after the first EOS is padding; the EOS itself was sampled and counts.
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
                out.prompts.append(batch[prompt_row])
                out.prompt_ids.append(prompt_ids)
                out.completion_ids.append(tokens)
            out.completions += tokenizer.batch_decode(
                out.completion_ids[-len(new_tokens) :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(rng_state)
    return out


def sample_completions(
    model, tokenizer, prompts: list[Text], *, num_samples: int, **kwargs
) -> list[list[str]]:
    """`num_samples` completion texts per prompt (special tokens dropped)."""
    texts = sample(model, tokenizer, prompts, num_samples=num_samples, **kwargs).completions
    return [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
