"""`dpo-run preview [sft|dpo] [overrides]`: the first examples exactly as that stage's model sees them.

For each example: the prompt and every completion decoded with special tokens visible (a chat template's
turns, BOS, EOS), their token counts, which tokens the loss trains on (the completions'; the prompt is
context), and what the length budgets cut. It reads the data and the tokenizer only (no weights) and
writes nothing: the check to run before a long job, to catch a template or truncation bug.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dpo_cli.data import Example, chat, example_splits, record_kind, sft_view
from dpo_cli.data.batches import TokenizedExample, tokenize_examples
from dpo_cli.errors import ConfigError
from dpo_cli.models import load_tokenizer

PREFERENCE_KINDS = ("pair", "ranked", "unpaired")


def show(cfg: DictConfig, overrides: list[str], stage_given: bool) -> None:
    """Print `cfg.preview.num_examples` examples of the stage `cfg.stage` composed with the user's
    `overrides`; without a stage word, `dpo` for preference records and `sft` for demonstrations."""
    from dpo_cli.stages.dpo import data_view

    if cfg.stage not in ("sft", "dpo"):
        raise ConfigError(f"dpo-run preview shows the sft and dpo stages' examples, not {cfg.stage}'s")
    if not stage_given:
        from dpo_cli.data import load_splits

        train, _ = load_splits(cfg.data)
        preference = train and record_kind(train[0]) in PREFERENCE_KINDS
        cfg.stage = "dpo" if preference else "sft"
    view = data_view(cfg) if cfg.stage == "dpo" else sft_view
    train, held_out, _ = example_splits(cfg.data, view)
    examples = held_out if cfg.preview.held_out else train
    tokenizer = load_tokenizer(cfg.model, checkpoint=_checkpoint(cfg))
    chat.use_template(tokenizer, cfg.data.chat_template)
    d = cfg.data
    split = "held-out" if cfg.preview.held_out else "training"
    print(
        f"preview: {split} examples of data={d.name} as `dpo-run {cfg.stage}` sees them "
        f"(loss={cfg.loss.name}, {len(examples)} in all; data.max_prompt_length_tokens="
        f"{d.max_prompt_length_tokens}, data.max_length_tokens={d.max_length_tokens}). Special tokens are "
        "shown; the loss trains on the completions' tokens, the prompt is context."
    )
    shown = examples[: cfg.preview.num_examples]
    tokenized = tokenize_examples(
        shown,
        tokenizer,
        max_prompt_length_tokens=d.max_prompt_length_tokens,
        max_length_tokens=d.max_length_tokens,
    )
    for number, (example, ids) in enumerate(zip(shown, tokenized, strict=True), start=1):
        print(f"\n=== example {number} of {len(examples)} ===")
        _show_example(example, ids, tokenizer)
    kept = [o for o in overrides if not o.startswith(("stage=", "preview."))]
    print(f"\nnothing was written; train with: dpo-run {' '.join([cfg.stage, *kept])}")


def _checkpoint(cfg: DictConfig):
    """DPO reads the SFT checkpoint's tokenizer (it may carry a template SFT was given)."""
    if cfg.stage != "dpo":
        return None
    from dpo_cli.engine import rundir

    try:
        return rundir.find_sft_checkpoint(cfg)
    except ConfigError:
        return None  # no SFT run yet: the model preset's own tokenizer is the one SFT will save


def _show_example(example: Example, tokenized: TokenizedExample, tokenizer) -> None:
    prompt, completions, *label = example
    full_prompt = chat.encode_prompt(tokenizer, prompt)
    cut = len(full_prompt) - len(tokenized.prompt_ids)
    note = f"; cut from the left: {cut} tokens {_decoded(tokenizer, full_prompt[:cut])}" if cut else ""
    print(f"--- prompt: {len(tokenized.prompt_ids)} tokens, not trained on{note}")
    print(_decoded(tokenizer, tokenized.prompt_ids, block=True))
    names = _completion_names(len(completions), label)
    for name, text, ids in zip(names, completions, tokenized.completion_ids, strict=True):
        full = chat.encode_completion(tokenizer, prompt, text)
        cut = len(full) - len(ids)
        dropped = _decoded(tokenizer, full[len(ids) - 1 :])
        note = f"; cut from the right: {dropped} ({cut} tokens; the end kept)" if cut else ""
        print(f"--- {name}: {len(ids)} tokens, all trained on{note}")
        print(_decoded(tokenizer, list(ids), block=True))


def _completion_names(count: int, label: list) -> list[str]:
    if label:  # KTO: the example's completion and another prompt's, scored for the KL estimate
        return [f"completion ({'desirable' if label[0] else 'undesirable'})", "KL partner (another prompt's)"]
    if count == 1:
        return ["completion"]
    if count == 2:
        return ["chosen", "rejected"]
    return [f"completion ranked {k}" for k in range(1, count + 1)]


def _decoded(tokenizer, ids: list[int], *, block: bool = False) -> str:
    """The tokens as text, special tokens included; a block is indented, its line ends shown (a
    template's newlines matter)."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not block:
        return repr(text)
    return "\n".join(f"  | {line}" for line in text.replace("\n", "\\n\n").rstrip("\n").split("\n"))
