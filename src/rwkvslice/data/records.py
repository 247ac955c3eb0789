"""Reading .txt and .jsonl files into token sequences with a loss mask.

A sample is `(tokens, loss)`: two equal-length lists, `loss[j]` True when token j is a target that is
trained (predicted from token j-1). `loss[0]` is always False: nothing predicts a sample's first token.

Plain text (.txt): documents are separated by one or more blank (whitespace-only) lines; a document's
lines are joined with "\\n" as written. Each document becomes `encode(doc) + [eod]`, loss everywhere.
(Documents that need blank lines inside go in a .jsonl file as {"text": ...}.)

JSON lines (.jsonl), one object per non-blank line, one of three kinds:
- {"text": T}                  -> encode(T) + [eod], loss everywhere;
- {"prompt": P, "response": R} -> encode(P) + encode(R) + [eod], loss on R's tokens and the eod;
- {"messages": [{"role": ..., "content": ...}, ...]} with roles system/user/assistant, rendered with
  the chat template below, loss on every assistant reply and the eod that ends it.

Chat template (each piece encoded separately so the loss mask falls on token boundaries):
    system    -> "System: {content}\\n\\n"                         no loss
    user      -> "User: {content}\\n\\n"                           no loss
    assistant -> "Assistant:"  then  " {content}" + [eod]        no loss, then loss
At inference, `encode_chat_prompt` gives the conversation so far followed by "Assistant:"; the model's
reply ends when it emits eod. Prompt and response are also encoded separately, so the ids a model is
trained on are exactly those `encode(prompt)` gives at inference time.

Other fields in a record are ignored. A record holding two kinds (e.g. "text" and "prompt") is an error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from rwkvslice.errors import DataError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def read_utf8(path: Path) -> str:
    """The whole file as text; DataError naming FILE:LINE for invalid UTF-8, FILE for an empty file."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def text_documents(path: Path) -> Iterator[tuple[int, str]]:
    """(first line number, document text) for each blank-line-separated document of a .txt file."""
    lines: list[str] = []
    start = 0
    for line_no, line in enumerate(read_utf8(path).split("\n"), 1):
        if line.strip():
            if not lines:
                start = line_no
            lines.append(line.removesuffix("\r"))
        elif lines:
            yield start, "\n".join(lines)
            lines = []
    if lines:
        yield start, "\n".join(lines)


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; DataError FILE:LINE for bad JSON or a non-object."""
    for line_no, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:  # Python's decoder recurses once per nesting level
            raise DataError(f"{path}:{line_no}: JSON nested too deeply to read (over ~"
                            f"{sys.getrecursionlimit()} levels of arrays/objects)") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record


def _require_str(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f'{where}: record is missing the field "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {_json_type(value)}')
    return value


def _json_type(value) -> str:
    names = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number", str: "string"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def record_kind(record: dict, where: str) -> str:
    kinds = [k for k, keys in (("messages", ("messages",)), ("prompt", ("prompt", "response")),
                               ("text", ("text",))) if any(key in record for key in keys)]
    if not kinds:
        raise DataError(f'{where}: record needs "text", "prompt" and "response", or "messages"')
    if len(kinds) > 1:
        raise DataError(f"{where}: record mixes kinds ({', '.join(kinds)}); use one kind per record")
    return kinds[0]


def encode_record(record: dict, tokenizer, where: str = "record") -> tuple[list[int], list[bool]]:
    """Tokens and loss mask of one .jsonl record (see the module docstring). `where` prefixes errors."""
    kind = record_kind(record, where)
    eod = tokenizer.eod_id
    if kind == "text":
        ids = tokenizer.encode(_require_str(record, "text", where)) + [eod]
        return ids, [False] + [True] * (len(ids) - 1)
    if kind == "prompt":
        prompt = tokenizer.encode(_require_str(record, "prompt", where))
        response = tokenizer.encode(_require_str(record, "response", where)) + [eod]
        return prompt + response, [False] * len(prompt) + [True] * len(response)
    return _encode_messages(record["messages"], tokenizer, where, reply_open=False)


def _encode_messages(messages, tokenizer, where: str, reply_open: bool) -> tuple[list[int], list[bool]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: field "messages" must be a non-empty array, got {_json_type(messages)}')
    ids: list[int] = []
    loss: list[bool] = []

    def add(piece: list[int], trained: bool):
        ids.extend(piece)
        loss.extend([trained] * len(piece))

    for n, message in enumerate(messages):
        here = f"{where}: messages[{n}]"
        if not isinstance(message, dict):
            raise DataError(f"{here} must be an object, got {_json_type(message)}")
        role = _require_str(message, "role", here)
        content = _require_str(message, "content", here)
        if role not in ROLES:
            raise DataError(f"{here}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "assistant":
            add(tokenizer.encode("Assistant:"), False)
            add(tokenizer.encode(" " + content) + [tokenizer.eod_id], True)
        else:
            add(tokenizer.encode(f"{ROLES[role]}: {content}\n\n"), False)
    if reply_open:
        add(tokenizer.encode("Assistant:"), False)
    if loss:
        loss[0] = False  # nothing predicts the first token
    return ids, loss


def encode_chat_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Ids of a conversation so far plus the "Assistant:" header: what a model continues at inference."""
    return _encode_messages(messages, tokenizer, "messages", reply_open=True)[0]
