"""Records -> views -> token batches, on hand-built records."""

import gzip
import json
import re

import pytest
import torch

from dpo_cli.config import DataConfig
from dpo_cli.data import load_splits, pair_view, ranked_view, read_jsonl, sft_view
from dpo_cli.data.batches import collate, tokenize_examples
from dpo_cli.errors import ConfigError
from dpo_cli.models import tiny_tokenizer
from tests.conftest import write_jsonl

RANKED = {
    "prompt": "P",
    "responses": ["a", "b", "c", "d"],
    "rewards": [0.1, 0.9, -0.5, 0.1],
    "ranking": [1, 0, 3, 2],
}


def test_ranked_record_gives_every_pair_whose_rewards_differ_enough():
    # rewards best first: b 0.9, a 0.1, d 0.1, c -0.5 -> 6 pairs, minus the a/d tie.
    assert pair_view([RANKED], min_reward_gap=0.0) == [
        ("P", ["b", "a"]),
        ("P", ["b", "d"]),
        ("P", ["b", "c"]),
        ("P", ["a", "c"]),
        ("P", ["d", "c"]),
    ]
    # gap 0.7 keeps b>a (0.8), b>d (0.8), b>c (1.4); a>c and d>c are 0.6.
    assert [c for _, c in pair_view([RANKED], min_reward_gap=0.7)] == [["b", "a"], ["b", "d"], ["b", "c"]]


def test_views_of_each_record_kind():
    pair = {"prompt": "Q", "chosen": "y", "rejected": "n"}
    sft = {"prompt": "Q", "completion": "y"}
    assert ranked_view([RANKED, pair]) == [("P", ["b", "a", "d", "c"]), ("Q", ["y", "n"])]
    assert sft_view([RANKED, pair, sft]) == [
        ("P", ["a"]),
        ("P", ["b"]),
        ("P", ["c"]),
        ("P", ["d"]),
        ("Q", ["y"]),
    ] + [("Q", ["y"])]
    with pytest.raises(ConfigError, match="needs pair or ranked records"):
        pair_view([sft])


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"prompt": "x", "chosen": 3, "rejected": "n"}, ["line 1", "'chosen'", "string"]),
        ({"prompt": "x", "responses": ["a", "b"], "ranking": [0, 0]}, ["permutation", "[0, 0]"]),
        ({"prompt": "x", "text": "y"}, ["expected fields", "text"]),
    ],
)
def test_bad_records_name_the_file_record_and_field(tmp_path, row, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ConfigError) as err:
        read_jsonl(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_held_out_prompts_never_appear_in_training(pair_file):
    train, held_out = load_splits(DataConfig(name="jsonl", path=str(pair_file), eval_fraction=0.25))
    assert len(held_out) == 10 and len(train) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_split_field_decides_held_out(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c", "split": "test" if i < 3 else "train"} for i in range(10)]
    train, held_out = load_splits(DataConfig(name="jsonl", path=str(write_jsonl(tmp_path / "s.jsonl", rows))))
    assert [r["prompt"] for r in held_out] == ["p0", "p1", "p2"] and len(train) == 7


def test_truncation_keeps_prompt_end_and_completion_eos():
    tok = tiny_tokenizer()  # one token per byte
    [ex] = tokenize_examples([("abcdef", ["ghijklmn"])], tok, max_prompt_length_tokens=4, max_length_tokens=8)
    # 4 prompt tokens + 3 completion tokens + EOS = the 8-token budget.
    assert tok.decode(ex.prompt_ids) == "cdef"
    assert tok.decode(ex.completion_ids[0][:-1]) == "ghi" and ex.completion_ids[0][-1] == tok.eos_token_id


def test_collate_scores_shared_completions_once():
    tok = tiny_tokenizer()
    examples = tokenize_examples(
        [("P", ["a", "b"]), ("P", ["a", "c"]), ("P", ["b", "c"]), ("Q", ["a", "b"])],
        tok,
        max_prompt_length_tokens=8,
        max_length_tokens=16,
    )
    batch = collate(examples, tok.pad_token_id)
    # Unique sequences: Pa, Pb, Pc, Qa, Qb -> 5 rows for 4 pairs (8 completions).
    assert batch["input_ids"].shape[0] == 5
    assert batch["index"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    assert batch["index_mask"].all()
    # Prompt tokens and padding are masked out of the labels: only completion + EOS remain.
    assert (batch["labels"] != -100).sum(-1).tolist() == [2, 2, 2, 2, 2]
    assert batch["attention_mask"].sum().item() == (batch["input_ids"] != tok.pad_token_id).sum().item()


def test_collate_masks_ragged_rankings():
    tok = tiny_tokenizer()
    examples = tokenize_examples(
        [("P", ["a", "b", "c"]), ("Q", ["x", "y"])], tok, max_prompt_length_tokens=8, max_length_tokens=16
    )
    batch = collate(examples, tok.pad_token_id)
    assert batch["index_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(batch["index"][1, :2], torch.tensor([3, 4]))


def test_a_file_of_mixed_record_kinds_is_refused_naming_both_lines(tmp_path):
    rows = [{"prompt": "x", "chosen": "a", "rejected": "b"}, {"prompt": "y", "completion": "c"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ConfigError, match=r"line 2: a sft record in a file of pair records \(line 1\)"):
        read_jsonl(path)


# Issue 22 (7, 14, 15): inputs that were tracebacks, silently wrong, or blamed on the wrong thing.
PAIRS = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
RANKED_ROW = {"prompt": "x", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (RANKED_ROW | {"rewards": [1.0, 0.5, 0.2, 0.1]}, ["'rewards' must be a list of 3 finite numbers"]),
        (RANKED_ROW | {"rewards": [1.0, 0.5]}, ["'rewards' must be a list of 3 finite numbers"]),
        (RANKED_ROW | {"rewards": ["1", "0", "2"]}, ["'rewards'", "['1', '0', '2']"]),
        (RANKED_ROW | {"rewards": [1.0, float("nan"), 0.0]}, ["'rewards'", "nan"]),
        (RANKED_ROW | {"ranking": 3}, ["'ranking' must be a permutation", "got 3"]),
        (RANKED_ROW | {"ranking": [0.0, 1.0, 2.0]}, ["'ranking' must be a permutation"]),
        (PAIRS[0] | {"split": ["test"]}, ["field 'split' must be a string"]),
        (PAIRS[0] | {"prompt": "a\ud800b"}, ["field 'prompt'", "lone surrogate"]),
    ],
)
def test_bad_fields_are_one_line_naming_the_line(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")  # json.dumps writes NaN and the surrogate as JSON allows
    with pytest.raises(ConfigError) as err:
        read_jsonl(path)
    assert f"{path} line 1:" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_bom_gzip_and_parquet_files_are_read(tmp_path):
    import pyarrow
    import pyarrow.parquet

    text = "".join(json.dumps(r) + "\n" for r in PAIRS)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as f:
        f.write(text)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(PAIRS), tmp_path / "pairs.parquet")
    for name in ("bom.jsonl", "pairs.jsonl.gz", "pairs.parquet"):
        assert read_jsonl(tmp_path / name) == PAIRS, name


def test_unreadable_files_say_why_in_one_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(
        json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n'
    )
    (tmp_path / "dir").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    expected = {
        "latin1.jsonl": "latin1.jsonl line 2: not UTF-8 text",
        "dir": "dir cannot be read: Is a directory",
        "loop": "loop cannot be read: Too many levels of symbolic links",
        "bad.jsonl.gz": "bad.jsonl.gz cannot be read",
        "missing.jsonl": "missing.jsonl does not exist",
    }
    for name, words in expected.items():
        with pytest.raises(ConfigError, match=re.escape(words)):
            read_jsonl(tmp_path / name)


def test_a_prompt_the_split_cannot_share_is_named_not_blamed_on_the_reward_gap(tmp_path):
    from dpo_cli.data import example_splits

    one_prompt = write_jsonl(tmp_path / "one.jsonl", [PAIRS[0] | {"chosen": c} for c in ("a", "b", "c")])
    cfg = DataConfig(name="jsonl", path=str(one_prompt))
    with pytest.raises(ConfigError, match="no training records: 3 record.s. with 1 distinct prompt") as err:
        example_splits(cfg, pair_view)
    assert "min_reward_gap" not in str(err.value) and "data.eval_path" in str(err.value)
    all_test = write_jsonl(tmp_path / "test.jsonl", [r | {"split": "test"} for r in PAIRS])
    with pytest.raises(ConfigError, match="no training records: the records' 'split' values are test"):
        example_splits(DataConfig(name="jsonl", path=str(all_test)), pair_view)
