"""Hub dataset adapters on small local copies in each source's own schema, and the presets that use them."""

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dpo_cli.config import DataConfig, conf_dir, validate
from dpo_cli.data import ADAPTERS, load_splits, pair_view, sft_view
from dpo_cli.data.hub import HUB_ADAPTERS, imdb_record
from dpo_cli.errors import ConfigError
from tests.conftest import write_jsonl

HH_PROMPT = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Tom.\n\nHuman: Another one?\n\nAssistant:"
)


def hh_row(i: int) -> dict:
    """A row of Anthropic/hh-rlhf: two whole transcripts sharing everything but the last reply."""
    return {"chosen": f"{HH_PROMPT} How about Felix {i}?", "rejected": f"{HH_PROMPT} I do not know."}


def tldr_comparison_row(i: int) -> dict:
    """A row of CarperAI/openai_summarize_comparisons: the post without the cue, summaries with it."""
    return {
        "prompt": f"SUBREDDIT: r/cats\nTITLE: My cat {i}\nPOST: My cat sleeps all day and I worry.\n",
        "chosen": "TL;DR: cat sleeps a lot, owner worried",
        "rejected": "TL;DR: cats",
    }


def tldr_sft_row(i: int) -> dict:
    """A row of CarperAI/openai_summarize_tldr: the post ending with the cue, the reference summary."""
    return {
        "prompt": f"SUBREDDIT: r/cats\nTITLE: My cat {i}\nPOST: My cat sleeps all day and I worry.\nTL;DR:",
        "label": " cat sleeps a lot, owner worried",
    }


def shp_row(i: int, label: int) -> dict:
    """A row of stanfordnlp/SHP with every column of the source."""
    return {
        "post_id": f"p{i}",
        "domain": "askscience_train",
        "upvote_ratio": 0.98,
        "history": f"Why is the sky blue? ({i})",
        "c_root_id_A": f"a{i}",
        "c_root_id_B": f"b{i}",
        "created_at_utc_A": 1,
        "created_at_utc_B": 2,
        "score_A": 50,
        "score_B": 5,
        "human_ref_A": "Rayleigh scattering of sunlight.",
        "human_ref_B": "Because it reflects the ocean.",
        "labels": label,
        "seconds_difference": 1.0,
        "score_ratio": 10.0,
    }


def imdb_row(i: int) -> dict:
    """A row of stanfordnlp/imdb, with the source's <br /> line breaks."""
    return {
        "text": f"This film number {i} was a delight.<br /><br />The cast is superb and funny.",
        "label": 1,
    }


def test_every_hub_adapter_is_registered():
    assert set(HUB_ADAPTERS) == {"hh", "tldr", "shp", "imdb", "ultrafeedback"}
    assert set(HUB_ADAPTERS) <= set(ADAPTERS)


def test_hh_prompt_ends_with_the_last_assistant_cue(tmp_path, capsys):
    broken = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: bye\n\nAssistant: b"}
    path = write_jsonl(tmp_path / "train.jsonl", [hh_row(i) for i in range(10)] + [broken])
    records = ADAPTERS["hh"](DataConfig(name="hh", path=str(path)))
    assert len(records) == 10 and "dropped 1 of 11 rows" in capsys.readouterr().out
    assert records[3] == {"prompt": HH_PROMPT, "chosen": " How about Felix 3?", "rejected": " I do not know."}
    assert pair_view(records[:1]) == [(HH_PROMPT, [" How about Felix 0?", " I do not know."])]


def test_tldr_pairs_and_demonstrations_share_one_prompt_format(tmp_path):
    comparisons = tmp_path / "comparisons.parquet"
    pd.DataFrame([tldr_comparison_row(i) for i in range(4)]).to_parquet(comparisons)
    demonstrations = write_jsonl(tmp_path / "tldr.jsonl", [tldr_sft_row(i) for i in range(4)])
    [pair, *_] = ADAPTERS["tldr"](DataConfig(name="tldr", path=str(comparisons)))
    [sft, *_] = ADAPTERS["tldr"](DataConfig(name="tldr", path=str(demonstrations), demonstrations=True))
    prompt = "SUBREDDIT: r/cats\nTITLE: My cat 0\nPOST: My cat sleeps all day and I worry.\nTL;DR:"
    assert pair == {"prompt": prompt, "chosen": " cat sleeps a lot, owner worried", "rejected": " cats"}
    assert sft == {"prompt": prompt, "completion": " cat sleeps a lot, owner worried"}


def test_shp_prefers_the_labelled_comment(tmp_path):
    path = tmp_path / "train.json"  # SHP's files are JSON lines named *.json
    path.write_text("".join(json.dumps(shp_row(i, label=i % 2)) + "\n" for i in range(4)))
    records = ADAPTERS["shp"](DataConfig(name="shp", path=str(path)))
    assert records[0]["prompt"] == "\n\nHuman: Why is the sky blue? (0)\n\nAssistant:"
    assert records[0]["chosen"] == " Because it reflects the ocean."  # labels 0: B is preferred
    assert records[1]["chosen"] == " Rayleigh scattering of sunlight."  # labels 1: A is preferred
    assert records[1]["rejected"] == " Because it reflects the ocean."


def test_imdb_prompts_are_2_to_8_word_prefixes_of_the_review(tmp_path):
    path = tmp_path / "imdb.parquet"
    pd.DataFrame([imdb_row(i) for i in range(30)]).to_parquet(path)
    records = ADAPTERS["imdb"](DataConfig(name="imdb", path=str(path)))
    assert len(records) == 30
    lengths = {len(r["prompt"].split()) for r in records}
    assert lengths <= set(range(2, 9)) and len(lengths) > 1
    for i, r in enumerate(records):
        assert r["prompt"] + r["completion"] == imdb_row(i)["text"].replace("<br />", "\n")
        assert r["completion"][0].isspace()
    # The prefix depends on the review only: the same in any run, order or split.
    assert imdb_record(imdb_row(7)) == records[7]
    with pytest.raises(ConfigError, match="needs pair or ranked records"):
        pair_view(records)
    assert sft_view(records[:1]) == [(records[0]["prompt"], [records[0]["completion"]])]


def test_a_directory_copy_gives_the_sources_train_and_test_splits(tmp_path):
    copy = tmp_path / "hh-rlhf"
    copy.mkdir()
    write_jsonl(copy / "train.jsonl", [hh_row(i) for i in range(6)])
    write_jsonl(copy / "test.jsonl", [hh_row(i) for i in range(100, 103)])
    train, held_out = load_splits(DataConfig(name="hh", path=str(copy)))
    assert len(train) == 6 and len(held_out) == 3
    assert {r["split"] for r in held_out} == {"test"}
    assert held_out[0]["chosen"] == " How about Felix 100?"
    train, _ = load_splits(DataConfig(name="hh", path=str(copy), max_records=2))
    assert len(train) == 2


def test_a_single_file_copy_is_split_by_prompt(tmp_path):
    path = write_jsonl(tmp_path / "tldr.jsonl", [tldr_sft_row(i) for i in range(20)])
    train, held_out = load_splits(DataConfig(name="tldr", path=str(path), eval_fraction=0.25))
    assert len(train) == 15 and len(held_out) == 5
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_a_copy_in_the_wrong_schema_names_the_expected_columns(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ConfigError) as err:
        ADAPTERS["shp"](DataConfig(name="shp", path=str(path)))
    assert "history, human_ref_A, human_ref_B, labels" in str(err.value) and "completion" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        ADAPTERS["hh"](DataConfig(name="hh", path=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("name", sorted(HUB_ADAPTERS))
def test_an_unreachable_hub_says_so_in_one_line_and_suggests_a_local_copy(name):
    """conftest sets HF_HUB_OFFLINE=1: loading from the hub must fail fast with a one-line hint."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data={name}", "stage=dpo"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError) as err:
        ADAPTERS[name](cfg.data)
    message = str(err.value)
    assert "\n" not in message
    assert "could not be reached" in message and "data.path=/path/to/local/copy" in message
    assert cfg.data.hub_id in message


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def test_tldr_reads_demonstrations_in_sft_and_winrate_only():
    assert compose_config("data=tldr", "stage=sft").data.demonstrations is True
    assert compose_config("data=tldr", "stage=winrate").data.demonstrations is True
    assert compose_config("data=tldr", "stage=dpo").data.demonstrations is False
    assert compose_config("data=tldr", "stage=dpo", "data.demonstrations=true").data.demonstrations is True


def test_hub_adapters_refuse_an_eval_path_in_records_format():
    cfg = compose_config("data=hh", "stage=dpo", "data.eval_path=test.jsonl")
    with pytest.raises(ConfigError, match="data.eval_path is for records files"):
        validate(cfg)


@pytest.mark.parametrize(
    ("experiment", "model", "data", "beta", "judge"),
    [
        ("imdb_paper", "gpt2_large", "imdb", 0.1, "reward"),
        ("tldr_paper", "gptj_6b", "tldr", 0.5, "openai"),
        ("hh_paper", "pythia_2.8b", "hh", 0.1, "openai"),
    ],
)
def test_paper_presets_carry_the_papers_settings(experiment, model, data, beta, judge):
    cfg = compose_config(f"experiment={experiment}", "stage=dpo")
    validate(cfg)
    assert (cfg.model.name, cfg.data.name, cfg.beta, cfg.beta, cfg.judge.name) == (
        model,
        data,
        beta,
        beta,
        judge,
    )
    # App. B: 64 pairs per step, RMSprop, lr 1e-6, 150 warm-up steps.
    t = cfg.trainer
    assert (t.batch_size_examples, t.optimizer, cfg.lr, t.lr_warmup_steps) == (64, "rmsprop", 1e-6, 150)
