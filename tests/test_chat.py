"""Records in TRL's formats, and conversations through chat templates token for token (issue 18)."""

import json

import pandas as pd
import pytest
from tokenizers.processors import TemplateProcessing

from dpo_cli.config import DataConfig
from dpo_cli.data import ADAPTERS, load_splits, pair_view, read_jsonl, sft_view, unpaired_view
from dpo_cli.data.batches import tokenize_examples
from dpo_cli.data.chat import Message, encode_completion, encode_prompt, parse_transcript, transcript
from dpo_cli.errors import ConfigError
from dpo_cli.models import tiny_tokenizer
from tests.conftest import write_jsonl

# The three template families of the issue, written as each family writes its own: SmolLM2's ChatML
# (its tokenizer's template as shipped), Qwen2's ChatML with its default system message, Llama 3's
# header/eot turns after a BOS that its tokenizer would also add on its own.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
    "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are "
    "a helpful assistant.<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ (m['content'] | trim) + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def template_tokenizer(family: str):
    """The tiny byte tokenizer with a family's special tokens and chat template; Llama 3's adds its BOS
    to every text it tokenizes with special tokens, as the real one does."""
    tokenizer = tiny_tokenizer()
    if family == "llama3":
        tokenizer.add_special_tokens(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
            }
        )
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tokenizer.bos_token_id)]
        )
        tokenizer.chat_template = LLAMA3
    else:
        tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
        tokenizer.chat_template = SMOLLM2 if family == "smollm2" else QWEN2
    return tokenizer


SYSTEM = Message("system", "Answer in one line.")
TURNS = (Message("user", "Name a cat."), Message("assistant", "Tom."), Message("user", "Another?"))
REPLY = (Message("assistant", "Felix."),)


@pytest.mark.parametrize("family", ["smollm2", "qwen2", "llama3"])
@pytest.mark.parametrize(
    "prompt", [TURNS[:1], TURNS, (SYSTEM, *TURNS)], ids=["one turn", "multi-turn", "system"]
)
def test_prompt_then_completion_is_the_whole_conversations_template(family, prompt):
    tokenizer = template_tokenizer(family)
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = encode_completion(tokenizer, prompt, REPLY)
    whole = tokenizer.apply_chat_template([m._asdict() for m in prompt + REPLY])["input_ids"]
    assert prompt_ids + completion_ids == whole
    # The prompt side ends with the generation prompt; the completion with one end of turn.
    generation_prompt = (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if family == "llama3"
        else ("<|im_start|>assistant\n")
    )
    assert tokenizer.decode(prompt_ids).endswith(generation_prompt)
    text = tokenizer.decode(prompt_ids + completion_ids)
    assert text.count(tokenizer.eos_token) == len(prompt) + 1 + (family != "llama3" and prompt[0] != SYSTEM)
    assert tokenizer.decode(completion_ids).rstrip("\n").endswith("Felix." + tokenizer.eos_token)
    assert completion_ids.count(tokenizer.eos_token_id) == 1
    # One BOS (Llama 3's template's own; its tokenizer would add another), a system message once.
    if family == "llama3":
        assert (prompt_ids + completion_ids).count(tokenizer.bos_token_id) == 1
    assert (
        text.count("system") == 1
        if (family != "llama3" or prompt[0] == SYSTEM)
        else text.count("system") == 0
    )


def test_text_records_keep_their_tokenization():
    """Standard text: the prompt with the tokenizer's special tokens, the completion plain, then EOS."""
    tokenizer = template_tokenizer("llama3")
    assert encode_prompt(tokenizer, "Hi") == [
        tokenizer.bos_token_id,
        *tokenizer("Hi", add_special_tokens=False)["input_ids"],
    ]
    assert encode_completion(tokenizer, "Hi", " there") == [
        *tokenizer(" there", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]


def test_a_tokenizer_without_a_template_refuses_conversations_in_one_line():
    with pytest.raises(
        ConfigError, match=r"need a chat template .* data.chat_template=FILE .* data.chat_template=none"
    ):
        encode_prompt(tiny_tokenizer(), TURNS[:1])


def test_a_cut_conversational_completion_still_ends_its_turn():
    tokenizer = template_tokenizer("qwen2")
    long_reply = (Message("assistant", "Felix " * 40),)
    [example] = tokenize_examples(
        [(TURNS[:1], [long_reply])], tokenizer, max_prompt_length_tokens=200, max_length_tokens=120
    )
    assert len(example.prompt_ids) + len(example.completion_ids[0]) == 120
    assert example.completion_ids[0][-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------
# Every format TRL documents -> the four record kinds
# ---------------------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "Name a cat."}
GOOD, BAD = {"role": "assistant", "content": "Tom."}, {"role": "assistant", "content": "No."}
CONVERSATION_PROMPT = (Message("user", "Name a cat."),)


@pytest.mark.parametrize(
    ("row", "record", "kind"),
    [
        (
            {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
            {"prompt": CONVERSATION_PROMPT, "chosen": (Message(**GOOD),), "rejected": (Message(**BAD),)},
            "conversational pair",
        ),
        (  # implicit prompt: every message but the last
            {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
            {"prompt": CONVERSATION_PROMPT, "chosen": (Message(**GOOD),), "rejected": (Message(**BAD),)},
            "conversational pair",
        ),
        (  # UltraFeedback's: the prompt as text beside conversations that hold it; scores kept
            {"prompt": "Name a cat.", "chosen": [USER, GOOD], "rejected": [USER, BAD], "score_chosen": 8.0},
            {
                "prompt": CONVERSATION_PROMPT,
                "chosen": (Message(**GOOD),),
                "rejected": (Message(**BAD),),
                "score_chosen": 8.0,
            },
            "conversational pair",
        ),
        (  # implicit prompt in text: the shared beginning, up to the space where they part
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            "pair",
        ),
        (
            {"messages": [USER, GOOD]},
            {"prompt": CONVERSATION_PROMPT, "completion": (Message(**GOOD),)},
            "conversational sft",
        ),
        (
            {"prompt": [USER], "completion": [GOOD]},
            {"prompt": CONVERSATION_PROMPT, "completion": (Message(**GOOD),)},
            "conversational sft",
        ),
        ({"text": "A whole document."}, {"prompt": "", "completion": "A whole document."}, "sft"),
        (
            {"prompt": [USER], "completion": [BAD], "label": False},
            {"prompt": CONVERSATION_PROMPT, "completion": (Message(**BAD),), "label": False},
            "conversational unpaired",
        ),
    ],
)
def test_every_trl_format_becomes_a_record(tmp_path, row, record, kind):
    from dpo_cli.data.records import normalize

    assert normalize(row, "row") == (record, kind)
    assert read_jsonl(write_jsonl(tmp_path / "one.jsonl", [row])) == [record]


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        (
            [
                {"prompt": "x", "chosen": "a", "rejected": "b"},
                {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
            ],
            "line 2: a conversational pair record in a file of pair records (line 1)",
        ),
        (
            [{"question": "x", "answer": "y"}],
            "line 1: no known kind of record has the fields answer, question",
        ),
        (
            [{"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "Other"}, BAD]}],
            "line 1: chosen and rejected differ before their last message",
        ),
        ([{"messages": [USER]}], "line 1: 'messages' must hold at least a user turn and an assistant turn"),
        (
            [{"prompt": [USER], "chosen": [{"role": "bot", "content": "x"}], "rejected": [BAD]}],
            "line 1: chosen[0] must be {'role': system | user | assistant",
        ),
        ([{"chosen": "abc", "rejected": "xyz"}], "line 1: chosen and rejected share no beginning"),
    ],
)
def test_records_of_no_known_kind_or_mixed_files_fail_naming_the_line(tmp_path, rows, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        read_jsonl(path)
    assert f"{path} {words}" in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_json_array_file_is_read(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    assert read_jsonl(tmp_path / "pairs.json") == rows


def test_scores_filter_pairs_by_the_reward_gap():
    records = [
        {"prompt": "a", "chosen": "x", "rejected": "y", "score_chosen": 8.0, "score_rejected": 7.5},
        {"prompt": "b", "chosen": "x", "rejected": "y", "score_chosen": 9.0, "score_rejected": 4.0},
        {"prompt": "c", "chosen": "x", "rejected": "y", "score_chosen": 5.0, "score_rejected": 5.0},
    ]
    assert [p for p, _ in pair_view(records)] == ["a", "b"]  # the tie is nothing to prefer
    assert [p for p, _ in pair_view(records, min_reward_gap=1.0)] == ["b"]


def test_conversational_views_and_kto_partners_compare_conversations():
    def reply(text: str) -> tuple:
        return (Message("assistant", text),)

    records = [
        {"prompt": (Message("user", f"Q{i}"),), "chosen": reply(f"good {i}"), "rejected": reply(f"bad {i}")}
        for i in range(3)
    ]
    assert sft_view(records)[0] == ((Message("user", "Q0"),), [reply("good 0")])
    kto = unpaired_view(records)
    assert len(kto) == 6
    for prompt, (completion, partner), _ in kto:
        # The KL estimate's partner completion belongs to another prompt's conversation.
        assert partner[0].content.split()[-1] != prompt[0].content[1:] == completion[0].content.split()[-1]


def test_chat_template_none_renders_plain_transcripts(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": f"Q{i}"}], "chosen": [GOOD], "rejected": [BAD]}
        for i in range(10)
    ]
    cfg = DataConfig(name="jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", rows)), chat_template="none")
    train, _ = load_splits(cfg)
    assert train[0]["prompt"].startswith("\n\nHuman: Q") and train[0]["prompt"].endswith("\n\nAssistant:")
    assert train[0]["chosen"] == " Tom."


def test_transcripts_parse_back_to_conversations():
    turns = (Message("user", "Hi\n\nthere"), Message("assistant", "Hello."), Message("user", "Bye"))
    assert parse_transcript(transcript(turns)) == turns


# ---------------------------------------------------------------------------------------------------------
# Hub adapters: UltraFeedback and HH as conversations, on local copies in the source's schema
# ---------------------------------------------------------------------------------------------------------


def ultrafeedback_copy(root):
    """A local copy of HuggingFaceH4/ultrafeedback_binarized as `huggingface-cli download` writes it."""
    data = root / "data"
    data.mkdir(parents=True)

    def prefs_row(i: int) -> dict:
        user = {"role": "user", "content": f"Write a haiku about cat {i}."}
        return {
            "prompt": user["content"],
            "prompt_id": f"id{i}",
            "chosen": [user, {"role": "assistant", "content": "Soft paws in the sun"}],
            "rejected": [user, {"role": "assistant", "content": "Cats."}],
            "messages": [user, {"role": "assistant", "content": "Soft paws in the sun"}],
            "score_chosen": 8.0,
            "score_rejected": 3.0 if i % 4 else 8.0,  # every 4th a tie
        }

    for split, rows in (("train_prefs", range(8)), ("test_prefs", range(8, 12))):
        pd.DataFrame([prefs_row(i) for i in rows]).to_parquet(data / f"{split}-00000-of-00001.parquet")
    for split, rows in (("train_sft", range(6)), ("test_sft", range(6, 8))):
        frame = pd.DataFrame(
            [{k: prefs_row(i)[k] for k in ("prompt", "prompt_id", "messages")} for i in rows]
        )
        frame.to_parquet(data / f"{split}-00000-of-00001.parquet")
    return root


def test_ultrafeedback_pairs_and_demonstrations_from_a_local_copy(tmp_path):
    root = ultrafeedback_copy(tmp_path / "ultrafeedback")
    train, held_out = load_splits(DataConfig(name="ultrafeedback", path=str(root)))
    assert (len(train), len(held_out)) == (8, 4)
    assert train[1]["prompt"] == (Message("user", "Write a haiku about cat 1."),)
    assert train[1]["chosen"] == (Message("assistant", "Soft paws in the sun"),)
    assert len(pair_view(train)) == 6  # the two ties are dropped
    sft_train, sft_held_out = load_splits(
        DataConfig(name="ultrafeedback", path=str(root), demonstrations=True)
    )
    assert (len(sft_train), len(sft_held_out)) == (6, 2)
    assert sft_train[0]["completion"] == (Message("assistant", "Soft paws in the sun"),)


def test_hh_as_conversations(tmp_path):
    prompt = "\n\nHuman: Name a cat.\n\nAssistant: Tom.\n\nHuman: Another?\n\nAssistant:"
    rows = [{"chosen": f"{prompt} Felix {i}.", "rejected": f"{prompt} No."} for i in range(4)]
    [record, *_] = ADAPTERS["hh"](
        DataConfig(name="hh", path=str(write_jsonl(tmp_path / "hh.jsonl", rows)), format="chat")
    )
    assert record == {
        "prompt": (Message("user", "Name a cat."), Message("assistant", "Tom."), Message("user", "Another?")),
        "chosen": (Message("assistant", "Felix 0."),),
        "rejected": (Message("assistant", "No."),),
    }


# ---------------------------------------------------------------------------------------------------------
# End to end: a conversational file through preview, sft and dpo (tiny model, a template from a file)
# ---------------------------------------------------------------------------------------------------------

TINY_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def conversational_pairs(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Film {i}?"}],
            "chosen": [{"role": "assistant", "content": "Lovely, great fun."}],
            "rejected": [{"role": "assistant", "content": "Dull."}],
        }
        for i in range(12)
    ]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def test_preview_shows_each_turn_once_and_writes_nothing(tmp_path, capsys):
    from dpo_cli.cli import main

    template = tmp_path / "template.jinja"
    template.write_text(TINY_TEMPLATE)
    data = conversational_pairs(tmp_path)
    main(
        [
            "preview",
            "model=tiny",
            "data=jsonl",
            f"data.path={data}",
            f"data.chat_template={template}",
            f"output_root={tmp_path / 'outputs'}",
            "preview.num_examples=1",
            "data.max_prompt_length_tokens=48",
            "data.max_length_tokens=56",
        ]
    )
    out = capsys.readouterr().out
    assert "as `dpo-run dpo` sees them" in out
    assert out.count("<system>Be kind.</s>") == 1 and out.count("<user>Film") == 1
    assert "--- chosen: " in out and "--- rejected: 7 tokens" in out  # "Dull." + </s> + "\n"
    assert "cut from the right" in out  # the chosen reply does not fit 56 tokens after its prompt
    assert not (tmp_path / "outputs").exists()


def test_conversations_without_a_template_fail_in_one_line(tmp_path, capsys):
    from dpo_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "model=tiny", "data=jsonl", f"data.path={conversational_pairs(tmp_path)}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpo-run: error: conversational records need a chat template") and "\n" not in err


@pytest.mark.slow
def test_a_conversational_file_trains_sft_then_dpo(tmp_path):
    from dpo_cli.cli import main
    from dpo_cli.logging import read_metrics

    template = tmp_path / "template.jinja"
    template.write_text(TINY_TEMPLATE)
    common = [
        "model=tiny",
        "logger=none",
        f"output_root={tmp_path}",
        "data=jsonl",
        f"data.path={conversational_pairs(tmp_path)}",
        "eval.num_prompts=2",
        "trainer.max_steps=2",
        "trainer.eval_every_steps=2",
    ]
    main(["sft", *common, f"data.chat_template={template}", "run_name=sft"])
    # The SFT checkpoint's tokenizer carries the template: DPO needs no data.chat_template.
    main(["dpo", *common, "run_name=dpo"])
    for stage in ("sft", "dpo"):
        run_dir = tmp_path / "default" / stage / stage
        assert (run_dir / "final" / "model.safetensors").is_file()
        assert any("train/loss" in m for m in read_metrics(run_dir))
    sample = json.loads((tmp_path / "default" / "dpo" / "dpo" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][1] == {"role": "user", "content": sample["prompt"][1]["content"]}
