"""The paper's hub datasets -> the records of DESIGN.md (pairs, or SFT demonstrations), with their splits.

    data=hh     Anthropic/hh-rlhf (chosen, rejected: whole transcripts) -> pairs; prompt = the transcript
                up to and including its last "\\n\\nAssistant:"
    data=tldr   CarperAI/openai_summarize_comparisons (prompt, chosen, rejected: "TL;DR: ...") -> pairs;
                with `data.demonstrations`: CarperAI/openai_summarize_tldr (prompt ending "TL;DR:", label)
                -> SFT records of the human reference summaries; prompt = post + "\\nTL;DR:" in both
    data=shp    stanfordnlp/SHP (history, human_ref_A, human_ref_B, labels: 1 when A is preferred) -> pairs
    data=imdb   stanfordnlp/imdb (text, label) -> SFT records: a 2-8 word prefix of a review -> the rest
    data=ultrafeedback  HuggingFaceH4/ultrafeedback_binarized: train_prefs/test_prefs (prompt, chosen,
                rejected: conversations, score_chosen, score_rejected) -> conversational pairs; with
                `data.demonstrations` train_sft/test_sft (messages) -> conversational SFT records
    data=hh data.format=chat   the HH transcripts as conversations (user / assistant turns)

Rows come through `datasets`: the hub's train and test splits of `data.hub_id`, or `data.path`, a local copy
in the source's own schema: one JSONL / JSON / parquet file (held-out prompts are then split off by
`data.eval_fraction`) or a directory of them whose file names give the splits (`train*`, `test*`;
`data/train_prefs-00000-of-00001.parquet`), as `huggingface-cli download --repo-type dataset` writes it.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path

from dpo_cli.config import DataConfig
from dpo_cli.data.chat import parse_transcript
from dpo_cli.data.records import normalize
from dpo_cli.errors import ConfigError

SPLITS = ("train", "test")
LOCAL_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}

Row = dict
ToRecord = Callable[[Row], dict | None]
# A source schema: the columns a row must have, and the row -> record map (None: the row is dropped).
Schema = tuple[tuple[str, ...], ToRecord]

# ---------------------------------------------------------------------------------------------------------
# Row -> record maps (pure functions)
# ---------------------------------------------------------------------------------------------------------

ASSISTANT_CUE = "\n\nAssistant:"
TLDR_CUE = "TL;DR:"
IMDB_PREFIX_WORDS = (2, 8)


def hh_record(row: Row) -> dict | None:
    """A pair whose prompt is the shared transcript up to and including its last "\\n\\nAssistant:"
    (the paper's single-turn dialogue setup); None when the two transcripts do not share that prompt."""
    chosen, rejected = row["chosen"], row["rejected"]
    cut = chosen.rfind(ASSISTANT_CUE)
    if cut < 0:
        return None
    prompt = chosen[: cut + len(ASSISTANT_CUE)]
    if not rejected.startswith(prompt):
        return None
    return {"prompt": prompt, "chosen": chosen[len(prompt) :], "rejected": rejected[len(prompt) :]}


def hh_chat_record(row: Row) -> dict | None:
    """An HH pair as conversations: the turns both transcripts share, then each one's last reply; None
    when they differ before it or do not end with the assistant."""
    chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
    if not (chosen and rejected) or chosen[:-1] != rejected[:-1] or chosen[-1].role != "assistant":
        return None
    if rejected[-1].role != "assistant" or len(chosen) < 2:
        return None
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def ultrafeedback_pair_record(row: Row) -> dict:
    """A binarized UltraFeedback preference row: chosen and rejected are whole conversations (the user's
    turn, then the reply), read as a records file's row is (`records.normalize`)."""
    fields = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    return normalize({k: row[k] for k in fields}, f"ultrafeedback prompt_id {row.get('prompt_id')}")[0]


def ultrafeedback_sft_record(row: Row) -> dict:
    """A binarized UltraFeedback SFT row: `messages`, its last assistant message the completion."""
    return normalize({"messages": row["messages"]}, f"ultrafeedback prompt_id {row.get('prompt_id')}")[0]


def tldr_prompt(post: str) -> str:
    """The post followed by the "TL;DR:" cue, the same for comparisons (whose prompts lack the cue) and
    SFT rows (whose prompts end with it), so both train one prompt format."""
    post = post.rstrip()
    return post if post.endswith(TLDR_CUE) else f"{post}\n{TLDR_CUE}"


def tldr_summary(text: str) -> str:
    """A summary as a completion of `tldr_prompt`: without its own "TL;DR:" cue, after one space."""
    text = text.strip()
    return " " + (text[len(TLDR_CUE) :].strip() if text.startswith(TLDR_CUE) else text)


def tldr_pair_record(row: Row) -> dict:
    return {
        "prompt": tldr_prompt(row["prompt"]),
        "chosen": tldr_summary(row["chosen"]),
        "rejected": tldr_summary(row["rejected"]),
    }


def tldr_sft_record(row: Row) -> dict:
    return {"prompt": tldr_prompt(row["prompt"]), "completion": tldr_summary(row["label"])}


def shp_record(row: Row) -> dict:
    """The preferred comment by `labels` (1: A); the post as a Human turn, as the paper's code frames SHP."""
    a, b = " " + row["human_ref_A"].strip(), " " + row["human_ref_B"].strip()
    chosen, rejected = (a, b) if int(row["labels"]) == 1 else (b, a)
    return {"prompt": f"\n\nHuman: {row['history']}{ASSISTANT_CUE}", "chosen": chosen, "rejected": rejected}


def imdb_record(row: Row) -> dict | None:
    """A review split after its first 2-8 words (paper App. C.1: prefixes of IMDb reviews as prompts).

    The number of words comes from an RNG seeded by the review itself, so a review gets the same prefix in
    every run, whatever the order, split or `data.max_records`. The completion is the rest of the review
    (SFT on reviews); None when the review is not longer than its prefix."""
    text = row["text"].replace("<br />", "\n").strip()
    num_words = random.Random(text).randint(*IMDB_PREFIX_WORDS)
    prefix = re.match(rf"\S+(?:\s+\S+){{{num_words - 1}}}", text)
    if prefix is None or prefix.end() == len(text):
        return None
    return {"prompt": text[: prefix.end()], "completion": text[prefix.end() :]}


# ---------------------------------------------------------------------------------------------------------
# Loading: hub or local copy -> (split, row)
# ---------------------------------------------------------------------------------------------------------


def _hub_unreachable(cfg: DataConfig, hub_id: str, schema_columns: str, err: Exception) -> ConfigError:
    offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return ConfigError(
        f"data={cfg.name}: the Hugging Face hub could not be reached for {hub_id}{offline}: "
        f"{str(err).splitlines()[0]}; download a copy where the hub is reachable and pass "
        f"data.path=/path/to/local/copy (JSONL, JSON or parquet in {hub_id}'s own schema: {schema_columns})"
    )


def _hub_rows(
    cfg: DataConfig, hub_id: str, schema_columns: str, splits: tuple[str, str]
) -> list[tuple[str | None, Row]]:
    import datasets

    limit = f"[:{cfg.max_records}]" if cfg.max_records else ""
    rows: list[tuple[str | None, Row]] = []
    for split, name in zip(SPLITS, splits, strict=True):
        try:
            table = datasets.load_dataset(hub_id, split=f"{name}{limit}")
        except datasets.exceptions.DatasetNotFoundError as err:
            raise ConfigError(
                f"data.hub_id={hub_id}: not found on the Hugging Face hub (or gated: `huggingface-cli "
                "login`); check the id or pass data.path=/path/to/local/copy"
            ) from err
        except (ConnectionError, TimeoutError) as err:
            raise _hub_unreachable(cfg, hub_id, schema_columns, err) from err
        rows += [(split, row) for row in table.to_list()]
    return rows


def _local_format(path: Path) -> str:
    for suffix, builder in LOCAL_FORMATS.items():
        if path.name.endswith(suffix):
            return builder
    raise ConfigError(
        f"data.path={path}: not a JSONL, JSON or parquet file ({', '.join(LOCAL_FORMATS)}) nor a directory"
    )


def _local_rows(cfg: DataConfig, path: Path, names: tuple[str, str]) -> list[tuple[str | None, Row]]:
    """A file: every row, no split (held-out prompts are split off later). A directory: its train and test
    splits (`names`: the source's names for them), as `datasets` infers them from the file names."""
    import datasets

    if not path.exists():
        raise ConfigError(f"data.path={path} does not exist")
    try:
        if path.is_file():
            table = datasets.load_dataset(_local_format(path), data_files=str(path), split="train")
            return [(None, row) for row in table.to_list()[: cfg.max_records]]
        splits = datasets.load_dataset(str(path))
    except (datasets.exceptions.DatasetGenerationError, ValueError, FileNotFoundError) as err:
        raise ConfigError(
            f"data.path={path}: cannot be read by `datasets` ({str(err).splitlines()[0]})"
        ) from err
    train, test = names
    if train not in splits:
        raise ConfigError(
            f"data.path={path}: no {train} split among its files ({', '.join(splits)}); name them {train}*, "
            f"{test}*"
        )
    if test not in splits:
        return [(None, row) for row in splits[train].to_list()[: cfg.max_records]]
    return [
        (split, row)
        for split, name in zip(SPLITS, names, strict=True)
        for row in splits[name].to_list()[: cfg.max_records]
    ]


def adapt(
    cfg: DataConfig,
    hub_id: str,
    schemas: list[Schema],
    why_dropped: str = "",
    splits: tuple[str, str] = SPLITS,
) -> list[dict]:
    """Records of every source row (local copy or hub), each by the first schema whose columns it has,
    tagged with its split (train / test) when the source has splits (`splits`: the source's names of
    its train and test splits)."""
    import datasets

    datasets.disable_progress_bars()
    schema_columns = " | ".join(", ".join(columns) for columns, _ in schemas)
    if cfg.path:
        rows = _local_rows(cfg, Path(cfg.path), splits)
    else:
        rows = _hub_rows(cfg, hub_id, schema_columns, splits)
    source = f"data.path={cfg.path}" if cfg.path else hub_id
    records: list[dict] = []
    dropped = 0
    for split, row in rows:
        to_record = next((fn for columns, fn in schemas if all(c in row for c in columns)), None)
        if to_record is None:
            raise ConfigError(
                f"{source}: expected the columns of data={cfg.name} ({schema_columns}); got {', '.join(row)}"
            )
        record = to_record(row)
        if record is None:
            dropped += 1
        else:
            records.append(record if split is None else record | {"split": split})
    if dropped:
        print(f"data={cfg.name}: dropped {dropped} of {len(rows)} rows ({why_dropped})")
    if not records:
        raise ConfigError(f"{source}: no usable rows for data={cfg.name}")
    return records


# ---------------------------------------------------------------------------------------------------------
# The adapters (registered in dpo_cli.data.ADAPTERS)
# ---------------------------------------------------------------------------------------------------------

HH_SCHEMA: Schema = (("chosen", "rejected"), hh_record)
HH_CHAT_SCHEMA: Schema = (("chosen", "rejected"), hh_chat_record)
ULTRAFEEDBACK_PAIR_SCHEMA: Schema = (
    ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    ultrafeedback_pair_record,
)
ULTRAFEEDBACK_SFT_SCHEMA: Schema = (("messages",), ultrafeedback_sft_record)
TLDR_PAIR_SCHEMA: Schema = (("prompt", "chosen", "rejected"), tldr_pair_record)
TLDR_SFT_SCHEMA: Schema = (("prompt", "label"), tldr_sft_record)
SHP_SCHEMA: Schema = (("history", "human_ref_A", "human_ref_B", "labels"), shp_record)
IMDB_SCHEMA: Schema = (("text",), imdb_record)


def hh(cfg: DataConfig) -> list[dict]:
    """Anthropic HH: preference pairs of single-turn dialogue continuations."""
    schema = HH_CHAT_SCHEMA if cfg.format == "chat" else HH_SCHEMA
    return adapt(cfg, cfg.hub_id, [schema], "no Assistant turn, or chosen and rejected differ before it")


def tldr(cfg: DataConfig) -> list[dict]:
    """TL;DR: comparison pairs, or with `data.demonstrations` the reference summaries (SFT records). A local
    copy may be either; its columns decide."""
    if cfg.demonstrations:
        return adapt(cfg, cfg.sft_hub_id or cfg.hub_id, [TLDR_SFT_SCHEMA, TLDR_PAIR_SCHEMA])
    return adapt(cfg, cfg.hub_id, [TLDR_PAIR_SCHEMA, TLDR_SFT_SCHEMA])


def shp(cfg: DataConfig) -> list[dict]:
    """Stanford Human Preferences: the comment preferred by `labels` against the other one."""
    return adapt(cfg, cfg.hub_id, [SHP_SCHEMA])


def imdb(cfg: DataConfig) -> list[dict]:
    """IMDb reviews as SFT records (prefix -> rest). The dataset has no preference pairs: make them with
    `dpo-run prefs prefs.prompts_path=PROMPTS` (scripts/write_prompts.py writes these prompts) and train on
    them with `data=jsonl data.path=RECORDS`."""
    return adapt(cfg, cfg.hub_id, [IMDB_SCHEMA], "review no longer than its 2-8 word prefix")


def ultrafeedback(cfg: DataConfig) -> list[dict]:
    """UltraFeedback binarized: conversational pairs with scores (train_prefs/test_prefs), or with
    `data.demonstrations` the SFT conversations (train_sft/test_sft)."""
    if cfg.demonstrations:
        return adapt(cfg, cfg.hub_id, [ULTRAFEEDBACK_SFT_SCHEMA], splits=("train_sft", "test_sft"))
    return adapt(cfg, cfg.hub_id, [ULTRAFEEDBACK_PAIR_SCHEMA], splits=("train_prefs", "test_prefs"))


HUB_ADAPTERS: dict[str, Callable[[DataConfig], list[dict]]] = {
    "hh": hh,
    "tldr": tldr,
    "shp": shp,
    "imdb": imdb,
    "ultrafeedback": ultrafeedback,
}
