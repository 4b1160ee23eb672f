"""Normalise conversation data (ShareGPT, OpenAI messages, UltraChat, JSON arrays, JSONL) to one row shape.

Every input record becomes either one row `{"id", "conversations": [{"role", "content", ...}]}` (turns may
carry reasoning_content, tool_calls, name, tool_call_id; a row may carry the "tools" it declares) or one
reject carrying its file, line and reason: nothing is dropped silently, rows in = rows out + rejected.

Repair policy (each repair is counted and printed, never silent):
- `dropped_leading_assistant`: assistant turns before the first user turn are dropped. ShareGPT V3 splits
  long chats into chunks and a third of the chunks start with the assistant; the dropped turn has no
  prompt to be conditioned on, while the rest of the chunk is good data.
- `merged_turns`: consecutive user/user or assistant/assistant turns are merged, separated by a blank
  line, when neither carries tool calls, reasoning or a name.
Anything else out of order (a system turn after the first, a tool turn that does not follow an assistant
or tool turn, consecutive turns that cannot be merged) is rejected as `bad_order`. A trailing user turn is
kept: it costs tokens but supervises nothing, and `regenerate` replays it.

The packaged ShareGPT file is a JSON array truncated mid-record, so arrays are parsed object by object
(`json.JSONDecoder.raw_decode`); the cut-off tail is one `truncated` reject. Bytes that are not UTF-8 are
decoded with `surrogateescape` and the affected record is rejected (`non_utf8`), so one bad byte costs one
record, not the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftforge import assets

REASONS = {
    "invalid_json": "the record is not valid JSON",
    "truncated": "the file ends inside the record",
    "non_utf8": "a string holds bytes that are not UTF-8 (or a lone surrogate)",
    "wrong_type": "a field has the wrong type",
    "missing_field": "a required field is missing",
    "unknown_role": "a turn has a role we do not know",
    "empty_content": "a turn has empty content",
    "no_assistant": "no assistant turn to learn from",
    "bad_order": "turns are out of order and cannot be repaired",
    "duplicate_id": "the id was already written",
}
FORMATS = ("auto", "sharegpt", "openai", "ultrachat")
ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
# Which list holds the turns, per forced format (auto accepts all of them).
_CONTAINERS = {
    "sharegpt": ("conversations",),
    "openai": ("messages", "conversations"),
    "ultrachat": ("data", "messages"),
    "auto": ("conversations", "messages", "data"),
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPTIONAL = {"reasoning_content": str, "tool_calls": list, "name": str, "tool_call_id": str}


@dataclass(frozen=True)
class Row:
    """A normalised conversation and where it came from."""

    data: dict[str, Any]  # {"id", "conversations"[, "tools"]}
    source: str
    line: int
    repairs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reject:
    """A record that cannot be used, with enough context to find and fix it."""

    source: str
    line: int
    reason: str
    message: str
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "message": self.message,
                "id": self.id}

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}: {self.message}"


class BadRecord(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def resolve_input(path: str | Path) -> Path:
    """`sharegpt` names the packaged ShareGPT V3 file; anything else is a path."""
    return assets.sharegpt_path() if str(path) == "sharegpt" else Path(path)


# --- reading records -----------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int, Any] | Reject]:
    """(line, decoded JSON value) for each record of a JSON array or JSONL file, or a Reject."""
    source = str(path)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        yield from _array_records(text, start + 1, source)
        return
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield Reject(source, number, "invalid_json", f"{e.msg} at column {e.colno}")


def _array_records(text: str, pos: int, source: str) -> Iterator[tuple[int, Any] | Reject]:
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    end = len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        if pos >= end:
            yield Reject(source, line, "truncated", "the JSON array is not closed")
            return
        if text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # "Unterminated string" means the scanner hit the end of the file looking for the closing quote.
            if e.msg.startswith("Unterminated string") or not text[e.pos:].strip():
                yield Reject(source, line, "truncated", f"the file ends inside this record ({e.msg})")
            else:
                yield Reject(source, line, "invalid_json",
                             f"{e.msg} at line {e.lineno} column {e.colno}; the rest of the array is unreadable")
            return
        yield line, value
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        if pos < end and text[pos] == ",":
            pos += 1
        elif pos < end and text[pos] != "]":
            line += text.count("\n", counted, pos)
            yield Reject(source, line, "invalid_json", "expected ',' or ']' between records; stopped here")
            return


# --- normalising one record ----------------------------------------------------------------------


def _text(value: Any, where: str) -> str:
    """Message content as a string: a string, a list of text parts, or None (empty)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord("wrong_type", f"{where}: content part of type {kind!r} is not text")
        return "".join(parts)
    raise BadRecord("wrong_type", f"{where}: content is {type(value).__name__}, expected a string")


def _turn(raw: Any, index: int, fmt: str) -> dict[str, Any]:
    where = f"turn {index}"
    if not isinstance(raw, dict):
        raise BadRecord("wrong_type", f"{where} is {type(raw).__name__}, expected an object")
    if "from" in raw and fmt in ("sharegpt", "auto"):
        role_key, content_key = "from", "value"
    elif "role" in raw and fmt != "sharegpt":
        role_key, content_key = "role", "content"
    else:
        expected = "'from'" if fmt == "sharegpt" else "'role'" if fmt != "auto" else "'from' or 'role'"
        raise BadRecord("missing_field", f"{where} has no {expected}")
    role = raw[role_key]
    if not isinstance(role, str):
        raise BadRecord("wrong_type", f"{where}: {role_key} is {type(role).__name__}, expected a string")
    if role.lower() not in ROLES:
        raise BadRecord("unknown_role", f"{where}: role {role!r}")
    turn: dict[str, Any] = {"role": ROLES[role.lower()]}
    for key, kind in _OPTIONAL.items():
        value = raw.get(key)
        if value is None or value == "" or value == []:
            continue
        if not isinstance(value, kind):
            raise BadRecord("wrong_type", f"{where}: {key} is {type(value).__name__}, expected {kind.__name__}")
        turn[key] = value
    if content_key not in raw and not turn.get("tool_calls"):
        raise BadRecord("missing_field", f"{where} has no {content_key!r}")
    turn["content"] = _text(raw.get(content_key), where)
    if not turn["content"].strip() and not (turn["role"] == "assistant" and "tool_calls" in turn):
        raise BadRecord("empty_content", f"{where} ({turn['role']}) has empty content")
    if _has_surrogates(turn):
        raise BadRecord("non_utf8", f"{where} holds bytes that are not UTF-8")
    return {"role": turn.pop("role"), "content": turn.pop("content"), **turn}


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def _turns(obj: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    for key in _CONTAINERS[fmt]:
        if key in obj:
            break
    else:
        names = " or ".join(repr(k) for k in _CONTAINERS[fmt])
        raise BadRecord("missing_field", f"no {names} field")
    raw = obj[key]
    if not isinstance(raw, list):
        raise BadRecord("wrong_type", f"{key!r} is {type(raw).__name__}, expected a list")
    if key == "data":  # UltraChat: alternating user / assistant strings
        turns = []
        for i, text in enumerate(raw):
            if not isinstance(text, str):
                raise BadRecord("wrong_type", f"data[{i}] is {type(text).__name__}, expected a string")
            turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        for i, turn in enumerate(turns):
            if not turn["content"].strip():
                raise BadRecord("empty_content", f"turn {i} ({turn['role']}) has empty content")
            if _has_surrogates(turn["content"]):
                raise BadRecord("non_utf8", f"turn {i} holds bytes that are not UTF-8")
        return turns
    return [_turn(t, i, "openai" if fmt == "ultrachat" else fmt) for i, t in enumerate(raw)]


def _mergeable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() == {"role", "content"}


def repair_order(turns: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Apply the repair policy of the module docstring; raise BadRecord when the order is unusable."""
    repairs: list[str] = []
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        role = turn["role"]
        prev = out[-1]["role"] if out else None
        if role == "system":
            if out or i:
                raise BadRecord("bad_order", f"turn {i}: a system turn after the first turn")
        elif not any(t["role"] == "user" for t in out) and role != "user":
            if role == "tool":
                raise BadRecord("bad_order", f"turn {i}: a tool turn before any user turn")
            repairs.append("dropped_leading_assistant")
            continue
        elif role == "tool" and prev not in ("assistant", "tool"):
            raise BadRecord("bad_order", f"turn {i}: a tool turn after a {prev} turn")
        elif role == prev and role in ("user", "assistant"):
            if not _mergeable(out[-1], turn):
                raise BadRecord("bad_order", f"turn {i}: two {role} turns in a row that cannot be merged")
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + turn["content"]}
            repairs.append("merged_turns")
            continue
        out.append(turn)
    if not any(t["role"] == "assistant" for t in out):
        raise BadRecord("no_assistant", "no assistant turn" + (" after repairs" if repairs else ""))
    return out, repairs


def _record_id(obj: dict[str, Any], fallback: str) -> str:
    for key in ("id", "prompt_id", "conversation_id"):
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRecord("wrong_type", f"{key} is {type(value).__name__}, expected a string")
        if _has_surrogates(str(value)):
            raise BadRecord("non_utf8", f"{key} holds bytes that are not UTF-8")
        if str(value):
            return str(value)
    return fallback


def normalise(obj: Any, fmt: str = "auto", fallback_id: str = "") -> tuple[dict[str, Any], list[str]]:
    """One record -> (normalised row, repairs applied). Raises BadRecord."""
    if not isinstance(obj, dict):
        raise BadRecord("wrong_type", f"record is {type(obj).__name__}, expected an object")
    row_id = _record_id(obj, fallback_id)
    turns, repairs = repair_order(_turns(obj, fmt))
    row: dict[str, Any] = {"id": row_id, "conversations": turns}
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRecord("wrong_type", f"tools is {type(tools).__name__}, expected a list")
        if tools:
            row["tools"] = tools
    return row, repairs


def iter_conversations(
    paths: Iterable[str | Path], fmt: str = "auto", max_rows: int | None = None
) -> Iterator[Row | Reject]:
    """Every record of every input, in order, as a normalised Row or a Reject (ids unique across inputs)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    seen: dict[str, str] = {}
    written = 0
    for path in paths:
        path = resolve_input(path)
        source = str(path)
        for index, record in enumerate(_records(path)):
            if max_rows is not None and written >= max_rows:
                return
            if isinstance(record, Reject):
                yield record
                continue
            line, obj = record
            try:
                row, repairs = normalise(obj, fmt, fallback_id=f"{path.name}#{index}")
            except BadRecord as e:
                row_id = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
                yield Reject(source, line, e.reason, str(e), row_id)
                continue
            if row["id"] in seen:
                yield Reject(source, line, "duplicate_id", f"id {row['id']!r} already written from {seen[row['id']]}",
                             row["id"])
                continue
            seen[row["id"]] = f"{source}:{line}"
            written += 1
            yield Row(row, source, line, tuple(repairs))


def load_rows(paths: Iterable[str | Path], fmt: str = "auto", max_rows: int | None = None
              ) -> tuple[list[dict[str, Any]], list[Reject]]:
    """All usable rows and all rejects of the inputs."""
    rows, rejects = [], []
    for item in iter_conversations(paths, fmt, max_rows):
        if isinstance(item, Row):
            rows.append(item.data)
        else:
            rejects.append(item)
    return rows, rejects


# --- the prepare command -------------------------------------------------------------------------


@dataclass
class PrepareReport:
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)
    first_reject: Reject | None = None

    @property
    def rows_in(self) -> int:
        return self.written + sum(self.rejected.values())


def rejects_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".rejects.jsonl")


def prepare(inputs: list[str | Path], output: str | Path, fmt: str = "auto", strict: bool = False,
            max_rows: int | None = None) -> PrepareReport:
    """Write OUT and OUT.rejects.jsonl atomically; with strict, stop at the first reject and write nothing."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = PrepareReport()
    out_tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    rej_path = rejects_path(output)
    rej_tmp = rej_path.with_name(f".{rej_path.name}.{os.getpid()}.tmp")
    try:
        with open(out_tmp, "w", encoding="utf-8") as out, open(rej_tmp, "w", encoding="utf-8") as rej:
            for item in iter_conversations(inputs, fmt, max_rows):
                if isinstance(item, Reject):
                    report.rejected[item.reason] += 1
                    if strict:
                        report.first_reject = item
                        return report
                    rej.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
                    continue
                out.write(json.dumps(item.data, ensure_ascii=False) + "\n")
                report.written += 1
                report.repairs.update(item.repairs)
        os.replace(out_tmp, output)
        os.replace(rej_tmp, rej_path)
    finally:
        for tmp in (out_tmp, rej_tmp):
            tmp.unlink(missing_ok=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="conversation file (JSON array or JSONL); 'sharegpt' = the packaged ShareGPT V3")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--strict", action="store_true", help="exit 2 at the first bad record")
    parser.add_argument("--max-rows", type=int, default=None, help="stop after writing N rows")


def run(args: argparse.Namespace) -> int:
    report = prepare(args.input, args.output, args.format, args.strict, args.max_rows)
    if report.first_reject is not None:
        print(f"error: {report.first_reject} (--strict: nothing written)", file=sys.stderr)
        return 2
    rejected = sum(report.rejected.values())
    print(f"wrote {report.written} conversations to {args.output}")
    print(f"rejected {rejected} records to {rejects_path(args.output)}")
    for reason, count in report.rejected.most_common():
        print(f"  {reason:<14} {count:>7}  {REASONS[reason]}")
    if report.repairs:
        print("repaired turns in written rows (see the repair policy in `draftforge prepare --help`):")
    for repair, count in report.repairs.most_common():
        print(f"  {repair:<26} {count:>7}")
    print(f"rows in {report.rows_in} = written {report.written} + rejected {rejected}")
    return 0
