"""Records -> views -> token batches, on hand-built records."""

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
