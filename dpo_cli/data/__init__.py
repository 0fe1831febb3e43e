"""Datasets -> records (see DESIGN.md) -> the view a loss trains on.

Records (dpo_cli/data/records.py) are plain dicts of one of four kinds, their prompts and completions text
or conversations (dpo_cli/data/chat.py):
    pair:     {"prompt", "chosen", "rejected"} (+ optional "score_chosen", "score_rejected")
    ranked:   {"prompt", "responses", "ranking"} (+ optional "rewards"), ranking = indices, best first
    sft:      {"prompt", "completion"}
    unpaired: {"prompt", "completion", "label"}, label true (desirable) or false (KTO)
each with an optional "split". A view turns records into examples `(prompt, [completion, ...])`: one
completion for SFT, (chosen, rejected) for pairwise losses, K best-first completions for Plackett-Luce,
and for KTO `(prompt, [completion, another prompt's completion], label)`.
Adapters for hub datasets plug into ADAPTERS: a function from DataConfig to a list of records.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

from dpo_cli.config import DataConfig
from dpo_cli.data.chat import Text, as_transcripts
from dpo_cli.data.hub import HUB_ADAPTERS
from dpo_cli.data.records import EVAL_SPLITS, json_rows, read_jsonl, record_kind
from dpo_cli.errors import ConfigError

__all__ = ["json_rows", "read_jsonl", "record_kind"]  # re-exported: stages read their files through them

SHIPPED_SENTIMENT = Path(__file__).resolve().parent / "sentiment" / "records.jsonl"
SHIPPED_OPENINGS = Path(__file__).resolve().parent / "sentiment" / "openings.jsonl"

# (prompt, completions) or, for unpaired examples, (prompt, completions, desirable).
Example = tuple[Text, list[Text]] | tuple[Text, list[Text], bool]


def _sentiment(cfg: DataConfig) -> list[dict]:
    path = Path(cfg.path) if cfg.path else SHIPPED_SENTIMENT
    if not path.exists():
        raise ConfigError(f"{path} is missing; create it with `dpo-run prefs prefs.output_path={path}`")
    return read_jsonl(path)


def _jsonl(cfg: DataConfig) -> list[dict]:
    return read_jsonl(cfg.path)


# The paper's hub datasets (hh, tldr, shp, imdb) live in dpo_cli/data/hub.py.
ADAPTERS: dict[str, Callable[[DataConfig], list[dict]]] = {
    "sentiment": _sentiment,
    "jsonl": _jsonl,
    **HUB_ADAPTERS,
}


def load_splits(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) records. Held-out prompts never appear in training."""
    records = ADAPTERS[cfg.name](cfg)
    held_out = read_jsonl(cfg.eval_path) if cfg.eval_path else None
    if cfg.chat_template == "none":  # before anything compares prompts
        records = [as_transcripts(r) for r in records]
        held_out = held_out and [as_transcripts(r) for r in held_out]
    if held_out is not None:
        return records, held_out
    if any("split" in r for r in records):
        held_out = [r for r in records if r.get("split") in EVAL_SPLITS]
        return [r for r in records if r.get("split") not in EVAL_SPLITS], held_out
    # Split by prompt with a fixed RNG, not the run's seed: every run of an experiment sees one eval set.
    # Language-modelling records ({"text"}) have no prompt: each is its own group.
    group = [r["prompt"] or r["completion"] for r in records]
    prompts = sorted(set(group))
    random.Random(0).shuffle(prompts)
    held_out_prompts = set(prompts[: max(1, round(cfg.eval_fraction * len(prompts)))])
    return [r for r, g in zip(records, group, strict=True) if g not in held_out_prompts], [
        r for r, g in zip(records, group, strict=True) if g in held_out_prompts
    ]


def _ordered(record: dict) -> list[str]:
    return [record["responses"][i] for i in record["ranking"]]


def sft_view(records: list[dict]) -> list[Example]:
    """Demonstrations; for pairs the chosen completion; for ranked records every response (they are the
    sampling distribution the reference model must match, as in the paper's sentiment setup)."""
    examples: list[Example] = []
    for r in records:
        kind = record_kind(r)
        completions = (
            [r["completion"]]
            if kind in ("sft", "unpaired")
            else [r["chosen"]]
            if kind == "pair"
            else r["responses"]
        )
        examples += [(r["prompt"], [c]) for c in completions]
    return examples


def pair_view(records: list[dict], *, min_reward_gap: float = 0.0) -> list[Example]:
    """(prompt, [chosen, rejected]). A ranked record gives every pair of its ranking (6 for K = 4, the
    paper's sentiment setup) whose rewards, when given, differ by at least `min_reward_gap` (ties dropped);
    a pair with `score_chosen` and `score_rejected` (UltraFeedback's) is kept when they differ by at least
    that much too."""
    examples: list[Example] = []
    identical = 0
    for r in records:
        kind = record_kind(r)
        if kind in ("sft", "unpaired"):
            raise ConfigError(
                f"a preference loss needs pair or ranked records, got {kind} records (prompt+completion"
                f"{'+label: loss=kto trains on them' if kind == 'unpaired' else ''})"
            )
        scored = kind == "pair" and "score_chosen" in r and "score_rejected" in r
        if not scored or r["score_chosen"] - r["score_rejected"] >= max(min_reward_gap, 1e-12):
            pairs = [(r["chosen"], r["rejected"])] if kind == "pair" else []
        else:
            pairs = []
        rewards = r.get("rewards") if kind == "ranked" else None
        for better, worse in itertools.combinations(r["ranking"], 2) if kind == "ranked" else []:
            if rewards is None or rewards[better] - rewards[worse] >= max(min_reward_gap, 1e-12):
                pairs.append((r["responses"][better], r["responses"][worse]))
        for chosen, rejected in pairs:
            if chosen == rejected:  # nothing to prefer, and a zero-margin pair in every metric
                identical += 1
            else:
                examples.append((r["prompt"], [chosen, rejected]))
    if identical:
        print(f"data: dropped {identical} pair(s) whose chosen and rejected completions are identical")
    return examples


def ranked_view(records: list[dict]) -> list[Example]:
    """(prompt, completions best first); a pair is a ranking of two."""
    examples: list[Example] = []
    for r in records:
        kind = record_kind(r)
        if kind in ("sft", "unpaired"):
            raise ConfigError(f"loss=plackett_luce needs ranked or pair records, got {kind} records")
        examples.append((r["prompt"], [r["chosen"], r["rejected"]] if kind == "pair" else _ordered(r)))
    return examples


def unpaired_view(records: list[dict]) -> list[Example]:
    """KTO's examples: unpaired records as they are; a pair (or a ranking's best and worst) split into a
    desirable and an undesirable example. Each example also carries the completion of another prompt's
    example (a fixed, seeded pairing), scored beside its own: the mismatched pairs of every batch give
    KTO's reference point z0, the policy's KL to the reference (Ethayarajh et al. 2024, Sec. 4.1)."""
    labelled: list[tuple[str, str, bool]] = []
    for r in records:
        kind = record_kind(r)
        if kind == "sft":
            raise ConfigError(
                "loss=kto needs unpaired (prompt+completion+label), pair or ranked records, got SFT records"
            )
        if kind == "unpaired":
            labelled.append((r["prompt"], r["completion"], r["label"]))
        else:
            best, *_, worst = [r["chosen"], r["rejected"]] if kind == "pair" else _ordered(r)
            labelled += [(r["prompt"], best, True), (r["prompt"], worst, False)]
    if len({prompt for prompt, _, _ in labelled}) < 2:
        raise ConfigError(
            "loss=kto needs examples of at least 2 prompts (its KL estimate pairs prompts with "
            "other prompts' completions)"
        )
    order = list(range(len(labelled)))
    random.Random(0).shuffle(order)
    partner = {}
    for k, i in enumerate(order):
        # The next example in the shuffled order whose prompt differs.
        partner[i] = next(j for j in order[k + 1 :] + order[:k] if labelled[j][0] != labelled[i][0])
    return [
        (prompt, [completion, labelled[partner[i]][1]], label)
        for i, (prompt, completion, label) in enumerate(labelled)
    ]


def example_splits(
    cfg: DataConfig, view: Callable[[list[dict]], list[Example]]
) -> tuple[list[Example], list[Example], list[dict]]:
    """(train examples, held-out examples capped at `max_eval_examples`, held-out records) of a view.
    Runs before any model is loaded, so bad data fails fast."""
    train_records, eval_records = load_splits(cfg)
    for name, records in (("training", train_records), ("held-out", eval_records)):
        if not records:
            raise ConfigError(
                f"data={cfg.name}: no {name} records: {_why_no_records(cfg, train_records + eval_records)}"
            )
    train, held_out = view(train_records), view(eval_records)
    for name, examples, records in (("training", train, train_records), ("held-out", held_out, eval_records)):
        if not examples:
            # Only ranked records with rewards lose pairs to the gap (others only as identical pairs).
            why = (
                f"data.min_reward_gap={cfg.min_reward_gap} keeps only pairs whose rewards differ by that much"
                if any("rewards" in r or "score_chosen" in r for r in records)
                else "see the record kinds in README 'Your own data'"
            )
            raise ConfigError(
                f"data={cfg.name}: no {name} examples left for this loss from {len(records)} {name} "
                f"records ({why})"
            )
    return train, held_out[: cfg.max_eval_examples], eval_records


def _why_no_records(cfg: DataConfig, records: list[dict]) -> str:
    if any("split" in r for r in records):
        splits = sorted({r.get("split", "(none)") for r in records})
        return (
            f"the records' 'split' values are {', '.join(splits)}; training takes every split but "
            f"{', '.join(EVAL_SPLITS)}, held-out evaluation those (or give data.eval_path=FILE)"
        )
    prompts = len({r["prompt"] for r in records})
    return (
        f"{len(records)} record(s) with {prompts} distinct prompt(s); held-out prompts are split off by "
        f"prompt (data.eval_fraction={cfg.eval_fraction}), so give records of more prompts, a 'split' "
        "field, or data.eval_path=FILE"
    )
