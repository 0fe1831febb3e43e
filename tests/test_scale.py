"""Data at scale: tokenized Arrow tables cached by fingerprint, and the digest-keyed reference cache."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dpo_cli.config import DataConfig
from dpo_cli.data import example_splits, pair_view, unpaired_view
from dpo_cli.data.batches import RefTable, sequence_digest, tokenize_examples, train_batches
from dpo_cli.data.tokenized import TokenizedSet, tokenized_splits
from dpo_cli.models import tiny_tokenizer
from dpo_cli.reference import _write_part, read_cache


def _records_file(path: Path, num_prompts: int = 40) -> Path:
    with path.open("w") as f:
        for p in range(num_prompts):
            for k in range(2):  # two pairs of each prompt
                row = {"prompt": f"Prompt {p} says", "chosen": f" good {k} {p}" * 3, "rejected": f" bad {k}"}
                f.write(json.dumps(row) + "\n")
    return path


def _data_cfg(tmp_path: Path, path: Path, **overrides) -> DataConfig:
    base = OmegaConf.structured(DataConfig(name="jsonl"))
    settings = {"path": str(path), "cache_dir": str(tmp_path / "cache"), "max_prompt_length_tokens": 8}
    return OmegaConf.merge(base, settings | overrides)


def test_tokenized_tables_equal_direct_tokenization_and_a_second_run_reads_no_records(tmp_path, monkeypatch):
    cfg = _data_cfg(tmp_path, _records_file(tmp_path / "pairs.jsonl"))
    tokenizer = tiny_tokenizer()
    train, held_out, records = tokenized_splits(cfg, pair_view, tokenizer)
    expected_train, expected_held_out, expected_records = example_splits(cfg, pair_view)
    budgets = {"max_prompt_length_tokens": 8, "max_length_tokens": cfg.max_length_tokens}
    assert list(train) == tokenize_examples(expected_train, tokenizer, **budgets)
    assert list(held_out) == tokenize_examples(expected_held_out, tokenizer, **budgets)
    assert records == expected_records and len(train) == 72 and len(held_out) == 8
    assert all(len(ex.prompt_ids) == 8 for ex in train)  # "Prompt N says" is cut from the left

    def no_records(*args):
        raise AssertionError("records read on a cached run")

    monkeypatch.setattr("dpo_cli.data.tokenized.example_splits", no_records)
    again, again_held_out, again_records = tokenized_splits(cfg, pair_view, tokenizer)
    assert list(again) == list(train) and list(again_held_out) == list(held_out) and again_records == records
    [directory] = (tmp_path / "cache").iterdir()
    assert again.table.cache_files[0]["filename"].startswith(str(directory))  # memory-mapped from the cache

    # Another budget, view or records file is another key: it is built (here: refused, records unread).
    for other in (
        lambda: tokenized_splits(_data_cfg(tmp_path, cfg.path, max_length_tokens=64), pair_view, tokenizer),
        lambda: tokenized_splits(cfg, unpaired_view, tokenizer),
    ):
        with pytest.raises(AssertionError, match="records read"):
            other()
    Path(cfg.path).write_text(Path(cfg.path).read_text().replace("good 0 1", "fine 0 1"))
    with pytest.raises(AssertionError, match="records read"):
        tokenized_splits(cfg, pair_view, tokenizer)


def test_an_unfinished_build_is_not_read_and_batches_from_the_table_equal_those_from_a_list(tmp_path):
    cfg = _data_cfg(tmp_path, _records_file(tmp_path / "pairs.jsonl"))
    tokenizer = tiny_tokenizer()
    train, _, _ = tokenized_splits(cfg, pair_view, tokenizer)
    [directory] = (tmp_path / "cache").iterdir()
    (directory / "meta.json").unlink()  # as if the build had been killed before it finished
    (directory / "training.arrow").unlink()  # a new file: `train` still maps the old one
    (directory / "training.arrow").write_bytes(b"garbage")
    directory.rename(directory.with_name(directory.name + ".partial-1"))
    rebuilt, _, _ = tokenized_splits(cfg, pair_view, tokenizer)
    assert list(rebuilt) == list(train)
    as_list = list(rebuilt)
    for by_prompt in (True, False):
        from_table = list(
            zip(range(12), train_batches(rebuilt, 4, 0, seed=3, by_prompt=by_prompt), strict=False)
        )
        from_list = list(
            zip(range(12), train_batches(as_list, 4, 0, seed=3, by_prompt=by_prompt), strict=False)
        )
        for (_, a), (_, b) in zip(from_table, from_list, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # By prompt, a micro-batch of 4 takes two prompts' two pairs each: 2 unique prompts, 6 unique rows.
    batch = next(train_batches(rebuilt, 4, 0, seed=3, by_prompt=True))
    assert len(set(map(tuple, batch["input_ids"][:, :8].tolist()))) == 2


def test_tokenizing_in_two_processes_gives_the_same_table(tmp_path):
    path = _records_file(tmp_path / "pairs.jsonl", num_prompts=1200)
    tokenizer = tiny_tokenizer()
    one, _, _ = tokenized_splits(_data_cfg(tmp_path / "a", path), pair_view, tokenizer)
    two, _, _ = tokenized_splits(_data_cfg(tmp_path / "b", path, num_proc=2), pair_view, tokenizer)
    assert len(two.table.cache_files) == 2  # one Arrow file per process
    assert list(one) == list(two)
    np.testing.assert_array_equal(one.prompt_keys(), two.prompt_keys())


def test_unpaired_examples_keep_their_labels_through_the_table(tmp_path):
    cfg = _data_cfg(tmp_path, _records_file(tmp_path / "pairs.jsonl"))
    train, _, _ = tokenized_splits(cfg, unpaired_view, tiny_tokenizer())
    labels = [ex.desirable for ex in train]
    assert labels.count(True) == labels.count(False) == len(train) // 2
    assert TokenizedSet.of(list(train)).take([0, 1]) == train[:2]


def test_sequence_digests_and_the_reference_cache_read_only_what_is_wanted(tmp_path):
    a, b = ((1, 2), (3,)), ((1,), (2, 3))  # the same ids split elsewhere: another sequence
    assert sequence_digest(a) != sequence_digest(b) and len(sequence_digest(a)) == 16
    table = RefTable.of([a, b], [-1.5, -2.0])
    assert table[a] == -1.5 and table == {a: -1.5, b: -2.0} and table != {a: -1.5}
    # Digests ending in zero bytes (numpy's fixed-width bytes drop them when handing one back).
    digests = [bytes(15) + bytes([k]) for k in range(5)] + [bytes([7]) + bytes(15), bytes(16)]
    values = torch.arange(len(digests), dtype=torch.float32)
    _write_part(tmp_path, digests, values)
    wanted = [digests[6], digests[5], bytes([9]) * 16, digests[0]]
    assert read_cache(tmp_path, wanted) == {digests[6]: 6.0, digests[5]: 5.0, digests[0]: 0.0}
    assert read_cache(tmp_path, []) == {}
