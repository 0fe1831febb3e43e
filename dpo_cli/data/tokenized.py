"""Tokenized examples as Arrow tables (`datasets`), memory-mapped from a cache keyed by what made them.

`tokenized_splits` is how the training stages get their data. Its key (`data_fingerprint`) hashes the
records files' bytes, the data settings, the loss's view of the records and the tokenizer; a run whose key
is cached reads no records and tokenizes nothing: it maps `data.cache_dir/<key>/` and starts. Otherwise
the records are read and viewed as before (`example_splits`), tokenized by `datasets.map` (in
`data.num_proc` processes) into Arrow files there, and the directory is renamed into place only when
complete. A table is memory-mapped: a row is read when a batch needs it, so the resident memory of a run
does not grow with the number of examples (README "What a run costs as the data grows").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from dpo_cli.config import DataConfig
from dpo_cli.data import SHIPPED_SENTIMENT, Example, chat, example_splits
from dpo_cli.data.chat import Text

FORMAT = 1  # bump when the tables' columns or the tokenization change meaning
SETTINGS_OUTSIDE_THE_KEY = ("num_proc", "cache_dir")  # how the tables are built, not what they hold
FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "completion_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "prompt_key": datasets.Value("int64"),
        "prompt_cut": datasets.Value("bool"),
        "desirable": datasets.Value("bool"),
    }
)


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[tuple[int, ...], ...]
    desirable: bool | None = None
    """Unpaired examples (KTO): whether the first completion is desirable."""


def encode_examples(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length_tokens: int,
    max_length_tokens: int,
) -> tuple[list[TokenizedExample], list[bool]]:
    """Token ids of each example as `chat.encode_prompt` / `chat.encode_completion` give them (text as it
    is, conversations through the chat template), and whether its prompt was cut. Prompts keep their last
    `max_prompt_length_tokens` tokens; completions are cut from the right so that prompt + completion fits
    `max_length_tokens`, and a cut completion still ends with EOS."""
    prompts: dict[Text, list[int]] = {}
    completions: dict[tuple[Text, Text], list[int]] = {}
    eos = tokenizer.eos_token_id
    out, cut = [], []
    for prompt, texts, *label in examples:
        if prompt not in prompts:
            prompts[prompt] = chat.encode_prompt(tokenizer, prompt)
        prompt_ids = prompts[prompt]
        cut.append(len(prompt_ids) > max_prompt_length_tokens)
        prompt_ids = prompt_ids[-max_prompt_length_tokens:]
        room = max(max_length_tokens - len(prompt_ids), 1)  # EOS at least
        completion_ids = []
        for text in texts:
            if (prompt, text) not in completions:
                completions[prompt, text] = chat.encode_completion(tokenizer, prompt, text)
            ids = completions[prompt, text]
            completion_ids.append(tuple(ids if len(ids) <= room else [*ids[: room - 1], eos]))
        out.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids), *label))
    return out, cut


def say_long_prompts(count: int, max_prompt_length_tokens: int, name: str = "") -> None:
    if count:
        print(
            f"data: {count} {name + ' ' if name else ''}prompt(s) longer than "
            f"data.max_prompt_length_tokens={max_prompt_length_tokens} were cut from the left (their ends "
            "kept)"
        )


class TokenizedSet(Sequence):
    """Tokenized examples in an Arrow table: `prompt_ids`, `completion_ids`, `prompt_key` (a 64-bit
    digest of the prompt's ids, what batches group by), `prompt_cut` and, for unpaired examples,
    `desirable`. Rows read as `TokenizedExample`s."""

    def __init__(self, table: datasets.Dataset, unpaired: bool):
        self.table, self.unpaired = table, unpaired

    @classmethod
    def of(cls, examples: Sequence[TokenizedExample]) -> TokenizedSet:
        """A list of examples as a table in memory (tests and small callers hand lists)."""
        if isinstance(examples, TokenizedSet):
            return examples
        rows = [_row(ex.prompt_ids, ex.completion_ids, False, ex.desirable) for ex in examples]
        columns = {name: [row[name] for row in rows] for name in FEATURES}
        table = datasets.Dataset.from_dict(columns, features=FEATURES)
        return cls(table, unpaired=bool(examples) and examples[0].desirable is not None)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.take([i])[0]

    def __iter__(self) -> Iterator[TokenizedExample]:
        for start in range(0, len(self), 1024):
            yield from self[start : start + 1024]

    def take(self, ids) -> list[TokenizedExample]:
        """The examples at `ids`, read from the table in one go."""
        # datasets gathers from each memory-mapped chunk; pyarrow's `take` would join the chunks first,
        # reading the whole column into memory.
        rows = self.table[list(ids)]
        desirable = rows["desirable"] if self.unpaired else [None] * len(rows["prompt_ids"])
        return [
            TokenizedExample(tuple(p), tuple(map(tuple, c)), d)
            for p, c, d in zip(rows["prompt_ids"], rows["completion_ids"], desirable, strict=True)
        ]

    def prompt_keys(self) -> np.ndarray:
        """(N,) int64: equal for examples of the same prompt ids (the column alone is read)."""
        return self.table.data.table.column("prompt_key").to_numpy()


def prompt_key(prompt_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(np.asarray(prompt_ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _row(prompt_ids, completion_ids, cut: bool, desirable: bool | None) -> dict:
    return {
        "prompt_ids": list(prompt_ids),
        "completion_ids": [list(c) for c in completion_ids],
        "prompt_key": prompt_key(prompt_ids),
        "prompt_cut": cut,
        "desirable": bool(desirable),
    }


def _decode(text: str) -> chat.Text:
    value = json.loads(text)
    return value if isinstance(value, str) else chat.conversation(value, "cached example", "text")


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, cfg: dict) -> dict:
    """`datasets.map` function: JSON-encoded examples -> the table's columns (`encode_examples`)."""
    examples = [
        (_decode(p), [_decode(c) for c in cs], d)
        for p, cs, d in zip(batch["prompt"], batch["completions"], batch["desirable"], strict=True)
    ]
    encoded, cut = encode_examples(examples, tokenizer, **cfg)
    rows = [
        _row(e.prompt_ids, e.completion_ids, c, d)
        for e, c, d in zip(encoded, cut, batch["desirable"], strict=True)
    ]
    return {name: [row[name] for row in rows] for name in FEATURES}


def text_table(examples: list[Example]) -> datasets.Dataset:
    """The examples as an Arrow table of JSON texts (text or conversation alike), built a chunk at a time
    so that no second copy of every example's text is held as Python strings."""
    unpaired = bool(examples) and len(examples[0]) == 3
    chunks = [
        datasets.Dataset.from_dict(
            {
                "prompt": [json.dumps(chat.jsonable(ex[0])) for ex in chunk],
                "completions": [[json.dumps(chat.jsonable(c)) for c in ex[1]] for ex in chunk],
                "desirable": [bool(ex[2]) if unpaired else False for ex in chunk],
            }
        )
        for chunk in (examples[i : i + 10_000] for i in range(0, max(len(examples), 1), 10_000))
    ]
    return datasets.concatenate_datasets(chunks)


def tokenize_table(
    text: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, path: Path, *, name: str
) -> datasets.Dataset:
    """`text_table`'s examples tokenized by `datasets.map` into the Arrow file(s) `path` (one a process)."""
    budgets = {
        "max_prompt_length_tokens": cfg.max_prompt_length_tokens,
        "max_length_tokens": cfg.max_length_tokens,
    }
    # A process per thousand examples at most: starting one costs more than tokenizing a few.
    num_proc = min(cfg.num_proc, max(1, len(text) // 1000))
    return text.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "cfg": budgets},
        remove_columns=text.column_names,
        features=FEATURES,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(path),
        new_fingerprint=path.parent.name + name,
        desc=f"tokenizing {name} examples",
    )


def data_fingerprint(cfg: DataConfig, view_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The key of a tokenized copy: the records files' bytes, the data settings, the view and the
    tokenizer (its vocabulary, special tokens and chat template, as `datasets` hashes it)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings = {k: v for k, v in settings.items() if k not in SETTINGS_OUTSIDE_THE_KEY}
    digest = hashlib.sha256(json.dumps([FORMAT, view_name, settings], sort_keys=True, default=str).encode())
    for path in _source_files(cfg):
        digest.update(str(path).encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What makes a tokenizer's ids: a fast tokenizer's whole definition (vocabulary, merges, normalizer,
    special-token template), its special tokens and chat template; another tokenizer as `datasets` hashes it
    (which also sees state that differs between equal tokenizers, so it may miss the cache)."""
    if not tokenizer.is_fast:
        return Hasher.hash(tokenizer)
    parts = [type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), str(tokenizer.chat_template)]
    parts += [json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    parts += [str(getattr(tokenizer, name, None)) for name in ("add_bos_token", "add_eos_token")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _source_files(cfg: DataConfig) -> list[Path]:
    """The local files the records come from (a hub dataset read from the hub is keyed by its id)."""
    named = [cfg.path or (SHIPPED_SENTIMENT if cfg.name == "sentiment" else None), cfg.eval_path]
    if cfg.chat_template not in ("auto", "none"):
        named.append(cfg.chat_template)
    files = []
    for path in (Path(p) for p in named if p):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [p for p in files if p.is_file()]


def tokenized_splits(
    cfg: DataConfig, view: Callable[[list[dict]], list[Example]], tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenizedSet, TokenizedSet, list[dict]]:
    """(training examples, held-out examples, held-out records) of `view`, tokenized, from the data cache
    when it holds them (see the module docstring)."""
    chat.use_template(tokenizer, cfg.chat_template)
    view_name = getattr(view, "func", view).__name__
    directory = Path(cfg.cache_dir) / data_fingerprint(cfg, view_name, tokenizer)
    cached = (directory / "meta.json").is_file()
    if not cached:
        _build(cfg, view, tokenizer, directory)
    meta = json.loads((directory / "meta.json").read_text())
    splits = []
    for split in ("training", "held-out"):
        files = [datasets.Dataset.from_file(str(directory / f)) for f in meta[split]["files"]]
        splits.append(TokenizedSet(datasets.concatenate_datasets(files), meta["unpaired"]))
        say_long_prompts(meta[split]["long_prompts"], cfg.max_prompt_length_tokens, split)
    with (directory / "held_out_records.jsonl").open() as f:
        records = [_record_from_json(json.loads(line)) for line in f]
    if cached:
        print(f"data: tokenized examples read from {directory} (no records read)")
    return splits[0], splits[1], records


def _build(cfg: DataConfig, view, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Read, view and tokenize the records into `directory`, written under a temporary name first."""
    train, held_out, records = example_splits(cfg, view)
    meta: dict = {"unpaired": len(train[0]) == 3}
    texts = {"training": text_table(train), "held-out": text_table(held_out)}
    del train, held_out  # the tables hold the texts now
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for split, text in texts.items():
        table = tokenize_table(text, tokenizer, cfg, partial / f"{split}.arrow", name=split)
        columns = table.data.table
        cut = columns.column("prompt_cut").to_numpy(zero_copy_only=False)
        meta[split] = {
            "files": [Path(f["filename"]).name for f in table.cache_files],
            "num_examples": len(table),
            "long_prompts": len(np.unique(columns.column("prompt_key").to_numpy()[cut])),
        }
    with (partial / "held_out_records.jsonl").open("w") as f:
        f.writelines(json.dumps(_record_to_json(r)) + "\n" for r in records)
    (partial / "meta.json").write_text(json.dumps(meta))
    try:
        partial.rename(directory)
    except OSError:  # another run of the same data finished first: its copy is the same
        shutil.rmtree(partial, ignore_errors=True)


TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


def _record_to_json(record: dict) -> dict:
    out = {k: chat.jsonable(v) if k in TEXT_FIELDS else v for k, v in record.items()}
    if "responses" in record:
        out["responses"] = [chat.jsonable(v) for v in record["responses"]]
    return out


def _record_from_json(record: dict) -> dict:
    def text(value):
        return chat.conversation(value, "cached record", "text") if isinstance(value, list) else value

    out = {k: text(v) if k in TEXT_FIELDS else v for k, v in record.items()}
    if "responses" in record:
        out["responses"] = [text(v) for v in record["responses"]]
    return out
