"""Conversations, and how text and conversations become the token ids a model trains on.

A prompt or completion is either text (TRL's "standard" format) or a conversation: a tuple of `Message`s
(TRL's "conversational" format, `[{"role": ..., "content": ...}, ...]` in a file). Text is tokenized as it
is: the prompt with the tokenizer's special tokens (a Llama tokenizer's BOS), the completion without them,
then EOS. A conversation goes through the tokenizer's chat template, applied once to the whole
conversation: the prompt's tokens are the template of the prompt turns with the generation prompt
(`<|im_start|>assistant\\n`), the completion's tokens the rest of the whole conversation's template. So
prompt + completion is `apply_chat_template(prompt + completion)` token for token: one BOS (the template's
own; nothing is added on top), a system message once (a default one too), exactly one end of turn, and
no EOS appended after a turn the template already ended.

`data.chat_template` picks the template: `auto` (the tokenizer's), a Jinja file (set on the tokenizer, so
checkpoints carry it), or `none`: conversations become plain "\\n\\nHuman: ...\\n\\nAssistant: ..."
transcripts (the paper's HH format), for base models that have no template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from dpo_cli.errors import ConfigError

ROLES = ("system", "user", "assistant")
TRANSCRIPT_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}


class Message(NamedTuple):
    role: str
    content: str


Conversation = tuple[Message, ...]
Text = str | Conversation
"""A prompt or a completion: text, or the messages of a conversation (hashable either way)."""


def is_conversation(value: object) -> bool:
    """Whether a field read from a file is a conversation: a non-empty list of {role, content} objects."""
    return (
        isinstance(value, list | tuple) and bool(value) and all(isinstance(m, dict | Message) for m in value)
    )


def conversation(value: list, where: str, field: str) -> Conversation:
    """A file's list of messages as a Conversation; a one-line ConfigError naming the message if one is
    malformed."""
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, Message):
            messages.append(message)
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ConfigError(
                f"{where}: {field}[{i}] must be {{'role': {' | '.join(ROLES)}, 'content': string}}, got "
                f"{ {k: type(v).__name__ for k, v in message.items()} }"
            )
        messages.append(Message(role, content))
    return tuple(messages)


def jsonable(value: Text) -> str | list[dict]:
    """A prompt or completion as a file holds it."""
    return value if isinstance(value, str) else [m._asdict() for m in value]


def plain_text(value: Text) -> str:
    """What a reward function or a judge reads: text as it is; a conversation's contents, joined (a
    completion is one assistant message, so its text is that message's content)."""
    if isinstance(value, str):
        return value
    if len(value) == 1:
        return value[0].content
    return transcript(value)


def transcript(messages: Conversation, *, cue: bool = False) -> str:
    """ "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic HH's format); `cue` ends with "\\n\\nAssistant:"."""
    text = "".join(f"\n\n{TRANSCRIPT_ROLES[m.role]}: {m.content}" for m in messages)
    return text + "\n\nAssistant:" if cue else text


def parse_transcript(text: str) -> Conversation:
    """The inverse of `transcript`: HH's "\\n\\nHuman: ... \\n\\nAssistant: ..." as messages."""
    names = {name: role for role, name in TRANSCRIPT_ROLES.items()}
    messages: list[Message] = []
    for chunk in text.split("\n\n"):
        name, sep, rest = chunk.partition(": ")
        if sep and name in names:
            messages.append(Message(names[name], rest))
        elif messages:  # a paragraph break inside a turn
            messages[-1] = messages[-1]._replace(content=f"{messages[-1].content}\n\n{chunk}")
    return tuple(messages)


def as_transcripts(record: dict) -> dict:
    """`data.chat_template=none`: a conversational record as text, the prompt a transcript ending in the
    Assistant cue and each completion " " + its content."""
    return {
        key: transcript(value, cue=True)
        if key == "prompt"
        else [" " + plain_text(v) for v in value]
        if key == "responses"
        else " " + plain_text(value)
        if isinstance(value, tuple)
        else value
        for key, value in record.items()
    }


def use_template(tokenizer: PreTrainedTokenizerBase, setting: str) -> None:
    """Apply `data.chat_template` to the tokenizer: a file's template replaces its own (`auto` and `none`
    leave it as it is: `none` never reaches the tokenizer)."""
    if setting in ("auto", "none"):
        return
    path = Path(setting)
    try:
        tokenizer.chat_template = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.chat_template={setting}: cannot read the template file ({err})") from None


def _template(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation_prompt: bool
) -> str:
    if not tokenizer.chat_template:
        raise ConfigError(
            "conversational records need a chat template and this tokenizer has none: give "
            "data.chat_template=FILE (a Jinja template) or data.chat_template=none (plain Human:/Assistant: "
            "transcripts)"
        )
    return tokenizer.apply_chat_template(
        [m._asdict() for m in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Text) -> list[int]:
    """The prompt's token ids, as training and sampling both see them."""
    if isinstance(prompt, str):
        return _ids(tokenizer, prompt, True)
    # The template brings its own special tokens (a BOS in Llama 3's), so none are added on top.
    return _ids(tokenizer, _template(tokenizer, prompt, True), False)


def encode_completion(tokenizer: PreTrainedTokenizerBase, prompt: Text, completion: Text) -> list[int]:
    """The completion's token ids after `encode_prompt(prompt)`, ending with exactly one EOS or end of turn.

    For a conversation they are the whole conversation's template minus the prompt's: a template that
    renders the prompt alone differently from the same turns inside the conversation cannot be split
    into prompt and completion, and is refused."""
    eos = tokenizer.eos_token_id
    if isinstance(completion, str):
        return [*_ids(tokenizer, completion, False), eos]
    if isinstance(prompt, str):
        raise ConfigError("a conversational completion needs a conversational prompt")
    prompt_text = _template(tokenizer, prompt, True)
    whole = _template(tokenizer, prompt + completion, False)
    if not whole.startswith(prompt_text):
        raise ConfigError(
            "the chat template renders the prompt turns differently alone (with the generation prompt) than "
            "inside the whole conversation, so prompt and completion tokens cannot be split; give "
            "data.chat_template=FILE with a template that does not"
        )
    prompt_ids, whole_ids = _ids(tokenizer, prompt_text, False), _ids(tokenizer, whole, False)
    if whole_ids[: len(prompt_ids)] == prompt_ids:
        ids = whole_ids[len(prompt_ids) :]
    else:  # a token spanning the boundary: keep the prompt's tokens, tokenize the rest alone
        ids = _ids(tokenizer, whole[len(prompt_text) :], False)
    # The template ends the turn with a special token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, maybe
    # followed by a newline): a further EOS would be a second end (trl #4481).
    last = next((i for i in reversed(ids) if tokenizer.decode([i]).strip()), None)
    return ids if last in tokenizer.all_special_ids else [*ids, eos]
