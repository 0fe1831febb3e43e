"""The training loop's pieces: batch order, wandb mode, config tree shipped in the wheel."""

import itertools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dpo_cli.data.batches import pack_groups, tokenize_examples, train_batches
from dpo_cli.logging import wandb_mode
from dpo_cli.models import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _examples():
    pairs = [(f"prompt {p}", [f"good {i}", f"bad {i}"]) for p in range(5) for i in range(3)]
    return tokenize_examples(pairs, tiny_tokenizer(), max_prompt_length_tokens=16, max_length_tokens=32)


def _prompts_per_batch(by_prompt: bool, seed: int = 0) -> list[int]:
    batches = train_batches(_examples(), 3, 0, seed=seed, by_prompt=by_prompt)
    return [int(b["input_ids"].shape[0]) for b in itertools.islice(batches, 5)]


def test_batch_by_prompt_keeps_a_prompts_pairs_together_and_scores_shared_rows_once():
    # 5 prompts x 3 pairs, micro-batches of 3 pairs: each batch is one prompt's 3 pairs = 6 unique rows.
    assert _prompts_per_batch(by_prompt=True) == [6, 6, 6, 6, 6]


def test_batch_order_is_reproducible_and_seeded():
    def first_batches(seed):
        batches = train_batches(_examples(), 3, 0, seed=seed, by_prompt=False)
        return [b["input_ids"] for b in itertools.islice(batches, 5)]

    first, again, other = first_batches(1), first_batches(1), first_batches(2)
    assert all(a.equal(b) for a, b in zip(first, again, strict=True))
    assert not all(a.shape == b.shape and a.equal(b) for a, b in zip(first, other, strict=True))


def test_wandb_goes_offline_without_an_api_key(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode("auto") == "offline"
    assert "no wandb API key" in capsys.readouterr().out
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"


@pytest.mark.slow
def test_wheel_ships_the_config_tree_and_the_embedded_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)], check=True
    )
    [wheel] = tmp_path.glob("dpo_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dpo_cli/conf/config.yaml", "dpo_cli/conf/stage/dpo.yaml", "dpo_cli/conf/loss/dpo.yaml"} <= names
    assert {"dpo_cli/data/sentiment/records.jsonl", "dpo_cli/data/sentiment/openings.jsonl"} <= names


def test_pack_groups_fills_batches_exactly_and_splits_groups_only_when_it_must():
    sizes = [6, 5, 3, 6, 4, 6, 6, 3, 5, 4]  # 48 items in 10 groups
    start = itertools.accumulate([0, *sizes])
    groups = [list(range(s, s + n)) for s, n in zip(start, sizes, strict=False)]
    batches = list(pack_groups(groups, 12))
    assert [len(b) for b in batches] == [12, 12, 12, 12]
    assert sorted(i for b in batches for i in b) == list(range(48))  # each item once
    split = [g for g in groups if len({k for k, b in enumerate(batches) for i in b if i in g}) > 1]
    assert split == []  # 6+6, 6+6, 5+3+4, 3+5+4: every group fits whole
    # Groups larger than a batch are cut, and a last partial batch is dropped.
    assert [len(b) for b in pack_groups([list(range(7)), [7, 8]], 4)] == [4, 4]
