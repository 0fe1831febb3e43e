"""Datasets -> records (see DESIGN.md) -> the view a loss trains on.

Records are plain dicts of one of four kinds:
    pair:     {"prompt", "chosen", "rejected"}
    ranked:   {"prompt", "responses", "ranking"} (+ optional "rewards"), ranking = indices, best first
    sft:      {"prompt", "completion"}
    unpaired: {"prompt", "completion", "label"}, label true (desirable) or false (KTO)
each with an optional "split". A view turns records into examples `(prompt, [completion, ...])`: one
completion for SFT, (chosen, rejected) for pairwise losses, K best-first completions for Plackett-Luce,
and for KTO `(prompt, [completion, another prompt's completion], label)`.
Adapters for hub datasets plug into ADAPTERS: a function from DataConfig to a list of records.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from dpo_cli.config import DataConfig
from dpo_cli.data.hub import HUB_ADAPTERS
from dpo_cli.errors import ConfigError

SHIPPED_SENTIMENT = Path(__file__).resolve().parent / "sentiment" / "records.jsonl"
SHIPPED_OPENINGS = Path(__file__).resolve().parent / "sentiment" / "openings.jsonl"
EVAL_SPLITS = ("test", "eval", "validation", "heldout")

# (prompt, completions) or, for unpaired examples, (prompt, completions, desirable).
Example = tuple[str, list[str]] | tuple[str, list[str], bool]


def json_rows(path: str | Path, name: str) -> Iterator[tuple[str, object]]:
    """("<path> line N", value) of every non-blank line of a JSON-lines file, `.gz` ones decompressed and
    a UTF-8 byte-order mark skipped. Every JSON-lines file the user names is read through here, so that a
    file that cannot be read (missing, a directory, no permission, a symlink loop, bad gzip), bytes that
    are not UTF-8 or a line that is not JSON are one ConfigError naming `name` (how the user gave the
    file) or the line."""
    path = Path(path)
    number = 0
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise ConfigError(
                        f"{path} line {number}: not UTF-8 text ({err.reason} at byte {err.start}); save the "
                        "file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path} line {number}: not valid JSON ({err.msg})") from None
                yield f"{path} line {number}", value
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist") from None
    except (OSError, EOFError) as err:
        detail = getattr(err, "strerror", None) or str(err) or type(err).__name__
        at = f" (after line {number})" if number else ""
        raise ConfigError(f"{name} cannot be read{at}: {detail}") from None


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a records file: JSON lines (optionally gzipped), or a parquet file's rows (the
    format the hub's datasets come in)."""
    if path.suffix != ".parquet":
        yield from json_rows(path, f"data file {path}")
        return
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise ConfigError(f"data file {path} cannot be read as parquet: {str(err).splitlines()[0]}") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", row


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines (or `.jsonl.gz`, or parquet) file, each checked, all of one kind (pair,
    ranked, sft or unpaired).

    Read with the json module (not `datasets`' Arrow reader: it would parse the file a second time, and
    importing it costs ~0.5 s and ~95 MiB of resident memory in every run), so an error names the line.
    """
    path = Path(path)
    records, first_kind = [], None
    for where, record in _rows(path):
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        kind = _check_record(record, where)
        first_kind = first_kind or (kind, where.removeprefix(f"{path} "))
        if kind != first_kind[0]:
            raise ConfigError(
                f"{where}: a {kind} record in a file of {first_kind[0]} records ({first_kind[1]}); "
                "one file holds one kind"
            )
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no records")
    return records


def _check_record(record: dict, where: str) -> str:
    """Raise a one-line ConfigError naming `where` and the field if `record` is malformed; else its kind."""
    kind = record_kind(record, where)
    text_fields = {
        "pair": ("prompt", "chosen", "rejected"),
        "ranked": ("prompt",),
        "sft": ("prompt", "completion"),
        "unpaired": ("prompt", "completion"),
    }
    for name in text_fields[kind]:
        if not isinstance(record.get(name), str):
            raise ConfigError(f"{where}: field {name!r} must be a string")
        _check_text(record[name], where, name)
    if kind == "unpaired" and not isinstance(record["label"], bool):
        raise ConfigError(f"{where}: field 'label' must be true (desirable) or false (undesirable)")
    if "split" in record and not isinstance(record["split"], str):
        raise ConfigError(
            f"{where}: field 'split' must be a string (train, or one of {', '.join(EVAL_SPLITS)})"
        )
    if kind == "ranked":
        responses, ranking, rewards = record["responses"], record["ranking"], record.get("rewards")
        if not (
            isinstance(responses, list) and all(isinstance(r, str) for r in responses) and len(responses) >= 2
        ):
            raise ConfigError(f"{where}: 'responses' must be a list of at least 2 strings")
        for response in responses:
            _check_text(response, where, "responses")
        # bool is an int to Python, not an index to anyone.
        if not (
            isinstance(ranking, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
            and sorted(ranking) == list(range(len(responses)))
        ):
            raise ConfigError(
                f"{where}: 'ranking' must be a permutation of 0..{len(responses) - 1}, got {ranking}"
            )
        if rewards is not None and not (
            isinstance(rewards, list)
            and len(rewards) == len(responses)
            and all(
                isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r) for r in rewards
            )
        ):
            raise ConfigError(
                f"{where}: 'rewards' must be a list of {len(responses)} finite numbers, one per response, "
                f"got {rewards}"
            )
    return kind


def _check_text(text: str, where: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate ("\ud800" in the JSON): no tokenizer takes it
        raise ConfigError(
            f"{where}: field {name!r} holds {text[err.start : err.end]!r}, not valid Unicode (a lone "
            "surrogate)"
        ) from None


def record_kind(record: dict, where: str = "record") -> str:
    if "chosen" in record and "rejected" in record:
        return "pair"
    if "responses" in record and "ranking" in record:
        return "ranked"
    if "completion" in record:
        return "unpaired" if "label" in record else "sft"
    raise ConfigError(
        f"{where}: expected fields prompt+chosen+rejected, prompt+responses+ranking, prompt+completion or "
        f"prompt+completion+label; got {sorted(record)}"
    )


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
    if cfg.eval_path:
        return records, read_jsonl(cfg.eval_path)
    if any("split" in r for r in records):
        held_out = [r for r in records if r.get("split") in EVAL_SPLITS]
        return [r for r in records if r.get("split") not in EVAL_SPLITS], held_out
    # Split by prompt with a fixed RNG, not the run's seed: every run of an experiment sees one eval set.
    prompts = sorted({r["prompt"] for r in records})
    random.Random(0).shuffle(prompts)
    held_out_prompts = set(prompts[: max(1, round(cfg.eval_fraction * len(prompts)))])
    return [r for r in records if r["prompt"] not in held_out_prompts], [
        r for r in records if r["prompt"] in held_out_prompts
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
    paper's sentiment setup) whose rewards, when given, differ by at least `min_reward_gap` (ties dropped)."""
    examples: list[Example] = []
    identical = 0
    for r in records:
        kind = record_kind(r)
        if kind in ("sft", "unpaired"):
            raise ConfigError(
                f"a preference loss needs pair or ranked records, got {kind} records (prompt+completion"
                f"{'+label: loss=kto trains on them' if kind == 'unpaired' else ''})"
            )
        pairs = [(r["chosen"], r["rejected"])] if kind == "pair" else []
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
                if any("rewards" in r for r in records)
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
