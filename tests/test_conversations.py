"""`draftforge prepare`: every input format, the repair policy, and a malformed corpus in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftforge import assets
from draftforge.cli import main
from draftforge.data.conversations import Reject, Row, iter_conversations, prepare, rejects_path

DATA = Path(__file__).parent / "fixtures" / "data"
MALFORMED = DATA / "malformed.jsonl"
ARRAY = DATA / "malformed_array.json"
# (line, reason) of every bad record in the corpus; lines 1 and 11 are good, line 12 is blank.
MALFORMED_REJECTS = [
    (2, "invalid_json"), (3, "wrong_type"), (4, "missing_field"), (5, "unknown_role"), (6, "empty_content"),
    (7, "no_assistant"), (8, "bad_order"), (9, "non_utf8"), (10, "duplicate_id"), (13, "wrong_type"),
    (14, "wrong_type"), (15, "bad_order"),
]
ARRAY_REJECTS = [(3, "no_assistant"), (7, "truncated")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sharegpt_array_roles_and_system(tmp_path):
    src = tmp_path / "sg.json"
    src.write_text(json.dumps([
        {"id": "x", "conversations": [
            {"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
            {"from": "bing", "value": "hello"}, {"from": "user", "value": "more"}, {"from": "chatgpt", "value": "ok"},
            {"from": "human", "value": "and?"}, {"from": "bard", "value": "b"}, {"from": "gpt", "value": "g"},
        ]},
    ], indent=2))
    (row,) = [r.data for r in iter_conversations([src])]
    assert row == {"id": "x", "conversations": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "b\n\ng"},  # merged
    ]}


def test_openai_messages_with_tools_reasoning_and_parts(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    src = write_jsonl(tmp_path / "oa.jsonl", [{"id": 7, "tools": tools, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "use the tool", "tool_calls": [call]},
        {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"},
        {"role": "assistant", "content": "4.", "reasoning_content": ""},
    ]}])
    (row,) = [r.data for r in iter_conversations([src], fmt="openai")]
    assert row == {"id": "7", "tools": tools, "conversations": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [call]},
        {"role": "tool", "content": "4", "name": "add", "tool_call_id": "c1"},
        {"role": "assistant", "content": "4."},
    ]}
    assert list(row) == ["id", "conversations", "tools"]


def test_ultrachat_rows_and_normalised_rows(tmp_path):
    src = write_jsonl(tmp_path / "uc.jsonl", [
        {"id": "u1", "data": ["q1", "a1", "q2", "a2"]},
        {"prompt_id": "u2", "prompt": "q", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]},
        {"data": ["q", "a"]},  # no id: named after the file and record index
    ])
    rows = [r.data for r in iter_conversations([src], fmt="ultrachat")]
    assert rows == [
        {"id": "u1", "conversations": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                       {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
        {"id": "u2", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"id": "uc.jsonl#2",
         "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    # prepare's own output reads back unchanged (already-normalised rows)
    out = tmp_path / "out.jsonl"
    prepare([src], out)
    again = tmp_path / "again.jsonl"
    prepare([out], again)
    assert rows_of(again) == rows_of(out) == rows


def test_forced_format_rejects_other_shapes(tmp_path):
    src = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "o", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    items = list(iter_conversations([src], fmt="sharegpt"))
    assert isinstance(items[0], Row)
    assert isinstance(items[1], Reject) and items[1].reason == "missing_field" and items[1].line == 2
    assert [type(i) for i in iter_conversations([src])] == [Row, Row]  # auto takes both


def test_repairs_are_counted(tmp_path):
    out = tmp_path / "out.jsonl"
    report = prepare([MALFORMED], out)
    repaired = next(r for r in rows_of(out) if r["id"] == "repaired")
    assert repaired["conversations"] == [{"role": "user", "content": "q1\n\nq2"}, {"role": "assistant", "content": "a"}]
    assert report.repairs == {"dropped_leading_assistant": 1, "merged_turns": 1}


def test_malformed_corpus_non_strict(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["prepare", "--input", str(MALFORMED), "--input", str(ARRAY), "--output", str(out)]) == 0
    assert [r["id"] for r in rows_of(out)] == ["good-1", "repaired", "a1"]
    rejects = rows_of(rejects_path(out))
    assert rejects_path(out).name == "out.rejects.jsonl"
    assert [(Path(r["source"]).name, r["line"], r["reason"]) for r in rejects] == (
        [("malformed.jsonl", line, reason) for line, reason in MALFORMED_REJECTS]
        + [("malformed_array.json", line, reason) for line, reason in ARRAY_REJECTS]
    )
    assert all(r["message"] for r in rejects)
    printed = capsys.readouterr().out
    assert "rows in 17 = written 3 + rejected 14" in printed
    assert "wrong_type           3" in printed and "bad_order            2" in printed
    assert "dropped_leading_assistant        1" in printed


def strict_case(tmp_path: Path, line: int) -> Path:
    """The corpus' first (good) line followed by its bad line `line`."""
    lines = MALFORMED.read_bytes().split(b"\n")
    path = tmp_path / f"case{line}.jsonl"
    path.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")
    return path


@pytest.mark.parametrize(("line", "reason"), MALFORMED_REJECTS)
def test_strict_stops_at_each_failure_kind(tmp_path, capsys, line, reason):
    src = strict_case(tmp_path, line)
    out = tmp_path / "out.jsonl"
    assert main(["prepare", "--input", str(src), "--output", str(out), "--strict"]) == 2
    assert f"{src}:2: {reason}: " in capsys.readouterr().err
    assert not out.exists() and not rejects_path(out).exists()


def test_strict_truncated_array(tmp_path, capsys):
    src = tmp_path / "cut.json"
    text = ARRAY.read_text().splitlines()
    src.write_text("\n".join([text[0], text[1], text[6]]))  # a1, then the cut-off a3 on line 3
    assert main(["prepare", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--strict"]) == 2
    assert f"{src}:3: truncated: " in capsys.readouterr().err


def test_invalid_json_inside_an_array_stops_that_file(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text('[\n{"id": "a", "data": ["q", "a"]},\n{"id": "b", "data": ["q" "a"]},\n{"id": "c", "data": []}\n]')
    items = list(iter_conversations([src]))
    assert [type(i) for i in items] == [Row, Reject]
    assert (items[1].line, items[1].reason) == (3, "invalid_json") and "rest of the array" in items[1].message


def test_max_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    report = prepare([MALFORMED], out, max_rows=1)
    assert report.written == 1 and report.rows_in == 1 and [r["id"] for r in rows_of(out)] == ["good-1"]


def test_packaged_sharegpt(tmp_path, capsys):
    """The packaged file is a JSON array cut off mid-record: every complete conversation is read."""
    out = tmp_path / "sharegpt.jsonl"
    assert main(["prepare", "--input", "sharegpt", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    written = sum(1 for _ in out.open())
    rejects = rows_of(rejects_path(out))
    assert written >= 17_000
    assert f"rows in {written + len(rejects)} = written {written} + rejected {len(rejects)}" in printed
    assert [r["reason"] for r in rejects].count("truncated") == 1 and rejects[-1]["reason"] == "truncated"
    # a reject's line is where its object starts in the packaged file
    lines = assets.sharegpt_path().read_text().splitlines()
    first = rejects[0]
    assert lines[first["line"] - 1].strip() == "{" and f'"id": "{first["id"]}"' in lines[first["line"]]
