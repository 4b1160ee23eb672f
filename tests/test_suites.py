"""Prompt suites: MT-bench from its package, any JSONL, a stable held-out slice; chat-template rendering."""

from __future__ import annotations

import json

import pytest

from draftforge.eval import report
from draftforge.eval.suites import Conversation, conversation_from_row, is_heldout, load_suite, mtbench, render


def test_mtbench_has_80_two_turn_questions():
    suite = mtbench()
    assert len(suite.conversations) == 80
    assert all(len(c.turns) == 2 for c in suite.conversations)
    assert suite.num_prompts == 160
    assert len(load_suite("mtbench", limit=5).conversations) == 5


def test_rows_of_every_shape():
    assert conversation_from_row({"prompt": "hi"}).turns == ["hi"]
    assert conversation_from_row({"prompt": "  "}) is None
    norm = {"id": "a", "conversations": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}  # fmt: skip
    conv = conversation_from_row(norm)
    assert (conv.system, conv.turns, conv.id) == ("be brief", ["q1", "q2"], "a")
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert conversation_from_row(sharegpt, 7).turns == ["q"] and conversation_from_row(sharegpt, 7).id == "7"
    openai = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert conversation_from_row(openai).turns == ["x"]
    assert conversation_from_row({"conversations": [{"role": "assistant", "content": "only"}]}) is None


def test_jsonl_and_heldout(tmp_path):
    rows = [{"id": f"r{i}", "conversations": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": "a"}]} for i in range(2000)]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert len(load_suite(f"jsonl:{path}").conversations) == 2000
    assert len(load_suite(f"jsonl:{path}", limit=3).conversations) == 3
    held = load_suite(f"heldout:{path}")
    assert held.name == "heldout-train"
    assert 15 <= len(held.conversations) <= 70  # ~2 % of 2000
    ids = {c.id for c in held.conversations}
    assert ids == {r["id"] for r in rows if is_heldout(r["id"])}
    from draftforge.train.setup import split_eval

    _, eval_idx = split_eval([r["id"] for r in rows], 0.02)
    assert ids == {rows[i]["id"] for i in eval_idx}  # exactly the trainer's eval split
    path.write_text("\n".join(json.dumps(r) for r in reversed(rows)))  # order does not change the slice
    assert {c.id for c in load_suite(f"heldout:{path}").conversations} == ids
    assert len(load_suite(f"heldout:{path}@0.5").conversations) > 800
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("nope:x")


def test_render_multi_turn_with_smollm2_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conv = Conversation(turns=["First question?", "Second question?"])
    t1 = tok.decode(render(tok, conv))
    assert t1.endswith("<|im_start|>user\nFirst question?<|im_end|>\n<|im_start|>assistant\n")
    t2 = tok.decode(render(tok, conv, ["My own answer."]))
    assert "<|im_start|>assistant\nMy own answer.<|im_end|>" in t2
    assert t2.endswith("<|im_start|>user\nSecond question?<|im_end|>\n<|im_start|>assistant\n")
    assert t2.count("<|im_start|>system") == 1  # the template's default system prompt, once


def test_report_table_and_chart(tmp_path):
    results = {"mtbench": {"1,3,1,4": {"num_prompts": 2, "accept_length": 2.5, "acceptance": [0.8, 0.6, None],
                                       "throughput": 30.0, "plain_throughput": 20.0, "speedup": 1.5,
                                       "latency": 0.5, "vocab_coverage": 0.912,
                                       "ngram": {"accept_length": 2.75, "tokens_per_forward": 1.25}}}}  # fmt: skip
    text = report.table(results)
    assert "2.50" in text and "0.80 0.60 -" in text and "1.50" in text
    header, _, row = text.splitlines()
    assert "in vocab  n-gram tau  n-gram tok/fwd" in header and row.split()[7:10] == ["91.2%", "2.75", "1.25"]
    path = report.write_json(tmp_path / "r.json", {"target": "t"}, results)
    assert report.load_json(path) == ({"target": "t"}, results)
    assert report.plot(results, tmp_path / "r.png").stat().st_size > 1000
