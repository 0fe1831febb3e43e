"""Records files -> the records of DESIGN.md, checked, in every format TRL documents.

A record is a plain dict of one of four kinds; prompt and completions are text or conversations
(`dpo_cli.data.chat`):
    pair:     {"prompt", "chosen", "rejected"} (+ optional "score_chosen", "score_rejected")
    ranked:   {"prompt", "responses", "ranking"} (+ optional "rewards"), ranking = indices, best first
    sft:      {"prompt", "completion"}
    unpaired: {"prompt", "completion", "label"}, label true (desirable) or false (KTO)
each with an optional "split". A file's rows may also come as TRL writes them: an implicit prompt
({"chosen", "rejected"} only: their shared beginning is the prompt; for conversations, every message but
the last), {"messages"} (a conversation; its last assistant message is the completion), {"text"}
(language modelling: all completion), or conversations whose chosen/rejected repeat the prompt's turns
(UltraFeedback's). `normalize` turns each into one of the four kinds.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path

from dpo_cli.data.chat import Text, conversation, is_conversation
from dpo_cli.errors import ConfigError

EVAL_SPLITS = ("test", "eval", "validation", "heldout")
FORMATS = (
    "prompt+chosen+rejected (+score_chosen, score_rejected), chosen+rejected (implicit prompt), "
    "prompt+responses+ranking, prompt+completion, messages, text, or prompt+completion+label; each text "
    "a string or, in the conversational format, a list of {role, content} messages"
)


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


def _json_array(path: Path) -> list | None:
    """A `.json` file's top-level array (None when the file is JSON lines instead)."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # json_rows says what is wrong, line by line
    return value if isinstance(value, list) else None


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a records file: JSON lines (optionally gzipped), a JSON array, or a parquet file's
    rows (the format the hub's datasets come in)."""
    if path.suffix == ".json" and (array := _json_array(path)) is not None:
        for number, row in enumerate(array, start=1):
            yield f"{path} item {number}", row
        return
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
    """Records of a JSON-lines (`.jsonl`, `.jsonl.gz`), JSON or parquet file, each checked, all of one
    kind and format (a conversational pair file holds only conversational pairs).

    Read with the json module (not `datasets`' Arrow reader: it would parse the file a second time, and
    importing it costs ~0.5 s and ~95 MiB of resident memory in every run), so an error names the line.
    """
    path = Path(path)
    records, first = [], None
    for where, row in _rows(path):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
        record, kind = normalize(row, where)
        first = first or (kind, where.removeprefix(f"{path} "))
        if kind != first[0]:
            raise ConfigError(
                f"{where}: a {kind} record in a file of {first[0]} records ({first[1]}); one file holds one "
                "kind"
            )
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no records")
    return records


def normalize(row: dict, where: str) -> tuple[dict, str]:
    """(the record of a file's row, its kind: "pair", "conversational pair", ...); a one-line ConfigError
    naming `where` and the field when the row is of no known kind or malformed."""
    conversational = any(is_conversation(row.get(k)) for k in ("prompt", "chosen", "completion", "messages"))
    conversational = conversational or (
        isinstance(row.get("responses"), list) and any(is_conversation(r) for r in row["responses"])
    )
    if conversational:
        record = _conversational(row, where)
    elif "text" in row and "prompt" not in row and "completion" not in row:
        record = {"prompt": "", "completion": row["text"]} | _extras(row, "text")
    elif "chosen" in row and "rejected" in row and "prompt" not in row:
        record = _implicit_prompt(row, where)
    else:
        record = dict(row)
    kind = record_kind(record, where)
    _check(record, kind, where)
    return record, f"conversational {kind}" if conversational else kind


def record_kind(record: dict, where: str = "record") -> str:
    if "chosen" in record and "rejected" in record and "prompt" in record:
        return "pair"
    if "responses" in record and "ranking" in record and "prompt" in record:
        return "ranked"
    if "completion" in record and "prompt" in record:
        return "unpaired" if "label" in record else "sft"
    raise ConfigError(
        f"{where}: no known kind of record has the fields {', '.join(sorted(record))}; expected fields "
        f"{FORMATS}"
    )


def _extras(row: dict, *used: str) -> dict:
    return {k: v for k, v in row.items() if k not in used}


def _implicit_prompt(row: dict, where: str) -> dict:
    """Standard text: the prompt is the longest common beginning of chosen and rejected, ending before
    the whitespace where they part (so both completions start with it, as written)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise ConfigError(
            f"{where}: fields 'chosen' and 'rejected' must both be strings or both conversations"
        )
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    cut = max(chosen.rfind(" ", 0, common + 1), chosen.rfind("\n", 0, common + 1))
    cut = cut if cut > 0 else common
    if cut == 0:
        raise ConfigError(
            f"{where}: chosen and rejected share no beginning to take as the prompt (implicit-prompt "
            "records); give a 'prompt' field"
        )
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]} | _extras(
        row, "chosen", "rejected"
    )


def _conversational(row: dict, where: str) -> dict:
    """Conversations: a completion is the final assistant message; turns before it are the prompt, taken
    from the `prompt` field or, when chosen/rejected/messages hold the whole conversation, from them."""
    fields = {k: conversation(v, where, k) if is_conversation(v) else v for k, v in row.items()}
    if "responses" in row:
        fields["responses"] = [
            _split_turns(conversation(r, where, "responses"), where, "responses")[1]
            if is_conversation(r)
            else r
            for r in row["responses"]
        ]
    if "messages" in fields:
        messages = fields.pop("messages")
        if not isinstance(messages, tuple) or len(messages) < 2:
            raise ConfigError(f"{where}: 'messages' must hold at least a user turn and an assistant turn")
        fields |= {"prompt": messages[:-1], "completion": messages[-1:]}
    completion_keys = [k for k in ("chosen", "rejected", "completion") if k in fields]
    split = {k: _split_turns(fields[k], where, k) for k in completion_keys}
    prompts = {turns for turns, _ in split.values() if turns}
    if len(prompts) > 1:
        raise ConfigError(f"{where}: {' and '.join(split)} differ before their last message (the prompt)")
    given = fields.get("prompt")
    if prompts:
        (turns,) = prompts
        # UltraFeedback's rows repeat the prompt as text beside the conversations that hold it.
        if (
            given is not None
            and given != turns
            and not (isinstance(given, str) and given == turns[-1].content)
        ):
            raise ConfigError(f"{where}: 'prompt' is not the turns that {' and '.join(split)} start with")
        fields["prompt"] = turns
    elif isinstance(given, str):
        raise ConfigError(
            f"{where}: field 'prompt' must be a conversation (a list of messages) like the others"
        )
    for key, (_, last) in split.items():
        fields[key] = last
    if isinstance(fields.get("prompt"), tuple) and fields["prompt"][-1].role == "assistant":
        raise ConfigError(
            f"{where}: the prompt's last message is the assistant's; it must be the user's turn"
        )
    return fields


def _split_turns(value: object, where: str, field: str) -> tuple[tuple, tuple]:
    """(the turns before the completion, the completion: its last message, the assistant's)."""
    if not isinstance(value, tuple):
        raise ConfigError(
            f"{where}: field {field!r} must be a conversation (a list of messages) like the others"
        )
    if value[-1].role != "assistant":
        raise ConfigError(f"{where}: {field}'s last message must be the assistant's, got {value[-1].role!r}")
    return value[:-1], value[-1:]


def _check(record: dict, kind: str, where: str) -> None:
    """Raise a one-line ConfigError naming `where` and the field if `record` is malformed."""
    text_fields = {
        "pair": ("prompt", "chosen", "rejected"),
        "ranked": ("prompt",),
        "sft": ("prompt", "completion"),
        "unpaired": ("prompt", "completion"),
    }
    for name in text_fields[kind]:
        _check_text(record[name], where, name)
    if kind == "unpaired" and not isinstance(record["label"], bool):
        raise ConfigError(f"{where}: field 'label' must be true (desirable) or false (undesirable)")
    if "split" in record and not isinstance(record["split"], str):
        raise ConfigError(
            f"{where}: field 'split' must be a string (train, or one of {', '.join(EVAL_SPLITS)})"
        )
    for name in ("score_chosen", "score_rejected"):
        if name in record and not _finite(record[name]):
            raise ConfigError(f"{where}: field {name!r} must be a finite number, got {record[name]!r}")
    if kind == "ranked":
        _check_ranked(record, where)


def _check_ranked(record: dict, where: str) -> None:
    responses, ranking, rewards = record["responses"], record["ranking"], record.get("rewards")
    if not (isinstance(responses, list) and len(responses) >= 2):
        raise ConfigError(f"{where}: 'responses' must be a list of at least 2 strings")
    for response in responses:
        if isinstance(response, str) != isinstance(record["prompt"], str):
            raise ConfigError(f"{where}: 'responses' must be a list of at least 2 strings")
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
        isinstance(rewards, list) and len(rewards) == len(responses) and all(map(_finite, rewards))
    ):
        raise ConfigError(
            f"{where}: 'rewards' must be a list of {len(responses)} finite numbers, one per response, "
            f"got {rewards}"
        )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_text(value: Text, where: str, name: str) -> None:
    if isinstance(value, tuple):  # a conversation, its messages checked by chat.conversation
        for message in value:
            _check_text(message.content, where, name)
        return
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {name!r} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate ("\ud800" in the JSON): no tokenizer takes it
        raise ConfigError(
            f"{where}: field {name!r} holds {value[err.start : err.end]!r}, not valid Unicode (a lone "
            "surrogate)"
        ) from None
