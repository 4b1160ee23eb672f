"""Assistant-only loss masks on real templates: golden token ids and masks, one wrong bit fails.

The tokenizer is the real SmolLM2-135M-Instruct one (ChatML). Llama-3, Qwen3 and Mistral-style templates
from tests/fixtures/data are set on copies of it, with their special tokens added (new ids from 49152).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from draftforge.data import template
from draftforge.data.template import TemplateError, align_end, tokenize_conversation

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
FIXTURES = Path(__file__).parent / "fixtures" / "data"
ADD_TOOL = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                              "parameters": {"type": "object", "properties": {}}}}]


def variant(base, template: str | None, special=(), added=(), bos=None, eos=None):
    tok = copy.deepcopy(base)
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if added:
        tok.add_tokens(list(added))
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    if template:
        tok.chat_template = (FIXTURES / f"{template}.jinja").read_text()
    return tok


@pytest.fixture(scope="module")
def llama3(smollm2_tokenizer):
    tok = variant(smollm2_tokenizer, "llama3", special=["<|begin_of_text|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>")
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                      "<|eot_id|>"]) == [49152, 49153, 49154, 49155]
    return tok


@pytest.fixture(scope="module")
def mistral(smollm2_tokenizer):
    tok = variant(smollm2_tokenizer, "mistral", special=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "[INST]", "[/INST]"]) == [49152, 49153, 49154, 49155]
    return tok


@pytest.fixture(scope="module")
def qwen3(smollm2_tokenizer):
    tok = variant(smollm2_tokenizer, "qwen3",
                  added=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [49152, 49153]
    return tok


def assert_golden(sample, segments):
    """segments: (mask bit, token ids) in order; the sample must match them exactly."""
    ids = [t for _, seg in segments for t in seg]
    mask = [bit for bit, seg in segments for _ in seg]
    assert sample.input_ids == ids
    assert sample.loss_mask == mask


def supervised_runs(sample) -> list[str]:
    """The text of each maximal run of supervised tokens."""
    runs, previous = [], 0
    for bit, (a, b) in zip(sample.loss_mask, sample.offsets, strict=True):
        if bit and previous:
            runs[-1] += sample.text[a:b]
        elif bit:
            runs.append(sample.text[a:b])
        previous = bit
    return runs


# Token ids of the SmolLM2 vocabulary used below: <|im_start|> 1, <|im_end|> 2, "\n" 198, "\n\n" 1116,
# "system" 9690, "user" 4093, "assistant" 520 9531, "Hello" 19556, " Hello" 38699, "!" 17, " How" 1073,
# " can" 416, " I" 339, " help" 724, "?" 47, "2" 34, "+" 27, "4" 36, " " 216, "Hi" 26843, " there" 665,
# "Be" 6077, " Be" 1934, " brief" 5453, "." 30.
SMOL_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
               8182, 2, 198]  # <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n
HELLO = [19556, 17, 1073, 416, 339, 724, 47]  # "Hello! How can I help?"


def test_chatml_smollm2_golden(smollm2_tokenizer):
    sample = tokenize_conversation(smollm2_tokenizer, CHAT)
    assert_golden(sample, [
        (0, SMOL_SYSTEM + [1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198]),  # ...user\nHi there...assistant\n
        (1, HELLO + [2]),  # Hello! How can I help?<|im_end|>
        (0, [198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]),  # \n<|im_start|>user\n2+2?...assistant\n
        (1, [36, 2]),  # 4<|im_end|>
        (0, [198]),  # the newline after <|im_end|> is not supervised
    ])
    assert not sample.truncated


def test_llama3_golden(llama3):
    sample = tokenize_conversation(llama3, [{"role": "system", "content": "Be brief."}, *CHAT])
    assert_golden(sample, [
        # <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>
        (0, [49152, 49153, 9690, 49154, 198, 198, 6077, 5453, 30, 49155,
             49153, 4093, 49154, 198, 198, 26843, 665, 49155,  # <|start_header_id|>user<|end_header_id|>\n\nHi there..
             49153, 520, 9531, 49154, 198, 198]),  # <|start_header_id|>assistant<|end_header_id|>\n\n
        (1, HELLO + [49155]),  # Hello! How can I help?<|eot_id|>
        (0, [49153, 4093, 49154, 198, 198, 34, 27, 34, 47, 49155, 49153, 520, 9531, 49154, 198, 198]),
        (1, [36, 49155]),  # 4<|eot_id|>
    ])


def test_mistral_golden(mistral):
    sample = tokenize_conversation(mistral, [{"role": "system", "content": "Be brief."}, *CHAT])
    assert_golden(sample, [
        # <s>[INST] Be brief.\n\nHi there [/INST]
        (0, [49152, 49154, 1934, 5453, 30, 198, 198, 26843, 665, 216, 49155]),
        (1, [38699, 17, 1073, 416, 339, 724, 47, 49153]),  # " Hello! How can I help?</s>": the space is the answer's
        (0, [49154, 216, 34, 27, 34, 47, 216, 49155]),  # [INST] 2+2? [/INST]
        (1, [216, 36, 49153]),  # " 4</s>"
    ])


QWEN_HEAD = [1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198]  # <|im_start|>user\nHi there...assistant\n
QWEN_MID = [198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]  # \n<|im_start|>user\n2+2?...assistant\n
EMPTY_THINK = [49152, 1116, 49153, 198, 198]  # <think>\n\n</think>\n\n


def test_qwen3_empty_think_masked(qwen3):
    sample = tokenize_conversation(qwen3, CHAT, think="mask")
    assert_golden(sample, [
        (0, QWEN_HEAD), (1, HELLO + [2]), (0, QWEN_MID + EMPTY_THINK), (1, [36, 2]), (0, [198]),
    ])


def test_qwen3_empty_think_trained(qwen3):
    sample = tokenize_conversation(qwen3, CHAT, think="train")
    assert_golden(sample, [
        (0, QWEN_HEAD), (1, HELLO + [2]), (0, QWEN_MID), (1, EMPTY_THINK + [36, 2]), (0, [198]),
    ])


def test_qwen3_reasoning_content(qwen3):
    """Reasoning is rendered (and supervised) for the last turn only; the template drops earlier reasoning."""
    chat = [dict(m) for m in CHAT]
    chat[1]["reasoning_content"] = "Greet back."
    chat[3]["reasoning_content"] = "Add."
    sample = tokenize_conversation(qwen3, chat, think="mask")
    add = qwen3.encode("Add.", add_special_tokens=False)
    assert add == [7684, 30]  # Add .
    assert_golden(sample, [
        (0, QWEN_HEAD), (1, HELLO + [2]), (0, QWEN_MID), (1, [49152, 198, 7684, 30, 198, 49153, 198, 198, 36, 2]),
        (0, [198]),
    ])
    assert "Greet back" not in sample.text


def test_qwen3_tools_with_reasoning_in_several_rounds(qwen3):
    """Two tool rounds with reasoning, then a new user turn: earlier think blocks vanish from the full text,
    so every prefix differs from it by several blocks and must be aligned."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    chat = [
        {"role": "user", "content": "2+2+2?"},
        {"role": "assistant", "content": "", "reasoning_content": "first add", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "", "reasoning_content": "add again", "tool_calls": [call]},
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "It is 6.", "reasoning_content": "done"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]
    sample = tokenize_conversation(qwen3, chat, tools=ADD_TOOL)
    tool_call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>'
    assert supervised_runs(sample) == [tool_call, tool_call, "It is 6.<|im_end|>", "Welcome<|im_end|>"]
    assert "first add" not in sample.text and "<tool_response>\n6\n</tool_response>" in sample.text
    assert sample.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nWelcome<|im_end|>\n")


def test_llama3_tool_turns(llama3):
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    sample = tokenize_conversation(llama3, chat)
    call = '{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>'
    assert supervised_runs(sample) == [call, "It is 4.<|eot_id|>"]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n4<|eot_id|>" in sample.text


def test_template_that_rejects_the_conversation(mistral):
    chat = [*CHAT[:2], {"role": "tool", "content": "4"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(TemplateError) as e:
        tokenize_conversation(mistral, chat)
    assert e.value.reason == "template_error" and "alternate" in str(e.value)


def test_generation_markers_agree_with_diff(smollm2_tokenizer, monkeypatch):
    marked = variant(smollm2_tokenizer, "chatml_generation")
    chats = [CHAT, [{"role": "system", "content": "Be brief."}, *CHAT], CHAT[:2]]
    for chat in chats:
        by_markers = tokenize_conversation(marked, chat, method="markers")
        by_diff = tokenize_conversation(marked, chat, method="diff")
        plain = tokenize_conversation(smollm2_tokenizer, chat)
        assert by_markers.input_ids == by_diff.input_ids == plain.input_ids
        assert by_markers.loss_mask == by_diff.loss_mask == plain.loss_mask
    expected = tokenize_conversation(smollm2_tokenizer, CHAT).loss_mask
    monkeypatch.setattr(template, "_diff_spans", None)  # auto must take the markers path for this template
    assert tokenize_conversation(marked, CHAT).loss_mask == expected


def test_default_system_prompt_only_when_missing(smollm2_tokenizer):
    sample = tokenize_conversation(smollm2_tokenizer, CHAT, system_prompt="Be brief.")
    assert sample.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there")
    own = [{"role": "system", "content": "Be kind."}, *CHAT]
    sample = tokenize_conversation(smollm2_tokenizer, own, system_prompt="Be brief.")
    assert sample.text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n") and "Be brief" not in sample.text
    assert supervised_runs(sample) == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]


def test_last_turn_only(smollm2_tokenizer):
    full = tokenize_conversation(smollm2_tokenizer, CHAT)
    last = tokenize_conversation(smollm2_tokenizer, CHAT, last_turn_only=True)
    assert last.input_ids == full.input_ids
    assert supervised_runs(last) == ["4<|im_end|>"]
    assert last.loss_mask == [0] * (len(full.loss_mask) - 3) + [1, 1, 0]


def test_truncation(smollm2_tokenizer):
    full = tokenize_conversation(smollm2_tokenizer, CHAT)
    cut = len(SMOL_SYSTEM) + 11 + 3  # three tokens into the first answer
    sample = tokenize_conversation(smollm2_tokenizer, CHAT, max_length=cut)
    assert sample.truncated and len(sample.input_ids) == cut == len(sample.loss_mask) == len(sample.offsets)
    assert sample.input_ids == full.input_ids[:cut] and sample.loss_mask == full.loss_mask[:cut]
    assert sample.loss_mask[-3:] == [1, 1, 1] and sum(sample.loss_mask) == 3
    with pytest.raises(TemplateError) as e:
        tokenize_conversation(smollm2_tokenizer, CHAT, max_length=cut - 3)
    assert e.value.reason == "truncated_mask"


def test_template_without_assistant_turns_is_rejected_loudly(smollm2_tokenizer):
    tok = variant(smollm2_tokenizer, None)
    tok.chat_template = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}\n{% endif %}{% endfor %}"
    with pytest.raises(TemplateError) as e:
        tokenize_conversation(tok, CHAT)
    assert e.value.reason == "empty_mask"


@pytest.mark.parametrize("history", ["m.content | upper", "m.content[-3:]"])
def test_template_that_rewrites_history_is_a_mismatch(smollm2_tokenizer, history):
    """Earlier answers rendered differently once later turns exist. Upper-casing defeats the alignment;
    keeping only the answer's last characters aligns, but the located span then lacks the answer."""
    tok = variant(smollm2_tokenizer, None)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ HISTORY }}{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ).replace("HISTORY", history)
    with pytest.raises(TemplateError) as e:
        tokenize_conversation(tok, CHAT)
    assert e.value.reason == "template_mismatch"
    message = "not in its located span" if "[-3:]" in history else "cannot locate assistant turn 1"
    assert message in str(e.value)


def test_align_end():
    gap = "-" * 40  # blocks are told apart by the text between them (template text: headers, answers)
    full = f"<a>x</a>{gap}<b>y</b>{gap}<c>"
    assert align_end("<a>x</a>", full) == 8
    assert align_end("<a>THINKx</a>", full) == 8  # one extra block
    assert align_end(f"<a>T1x</a>{gap}<b>T2y</b>{gap}<c>", full) == len(full)  # two extra blocks
    assert align_end(f"<a>x</a>{gap}<z>", full) is None  # something full never had


def test_inspect_shows_the_mask(capsys):
    from draftforge.cli import main

    data = str(FIXTURES / "malformed.jsonl")
    assert main(["inspect", "--data", data, "--index", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "conversation 'repaired'" in out and "39 tokens, 2 supervised, 37 masked" in out
    assert "<|im_start|>assistant\n[[a<|im_end|>]]\n" in out and out.count("[[") == 1
    assert main(["inspect", "--data", data, "--index", "2"]) == 1
    assert "no usable conversation at index 2" in capsys.readouterr().err


def test_inspect_colours_supervised_runs(smollm2_tokenizer):
    from draftforge.data.inspect import MASKED, RESET, SUPERVISED, format_sample

    shown = format_sample(tokenize_conversation(smollm2_tokenizer, CHAT), color=True)
    assert f"{SUPERVISED}Hello! How can I help?<|im_end|>{RESET}{MASKED}\n<|im_start|>user" in shown
    assert f"{SUPERVISED}4<|im_end|>{RESET}{MASKED}\n{RESET}" in shown and shown.count(SUPERVISED) == 2


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen3", "mistral"])
def test_long_conversations_truncate_exactly(name, request):
    """Truncation keeps exactly the first max_length tokens of the whole sample, mask and offsets included."""
    tok = request.getfixturevalue("smollm2_tokenizer" if name == "smollm2" else name)
    chat = []
    for i in range(40):
        chat += [{"role": "user", "content": f"Question {i}: tell me about the number {i}?"},
                 {"role": "assistant", "content": f"The number {i} " + "is a fine number. " * (i % 7 + 1)}]
    whole = tokenize_conversation(tok, chat)
    for max_length in (60, 97, 256, 700, len(whole.input_ids) - 1, len(whole.input_ids)):
        sample = tokenize_conversation(tok, chat, max_length=max_length)
        assert sample.input_ids == whole.input_ids[:max_length]
        assert sample.loss_mask == whole.loss_mask[:max_length]
        assert sample.offsets == whole.offsets[:max_length]
        assert sample.truncated == (max_length < len(whole.input_ids))


def test_template_that_transforms_content_consistently(smollm2_tokenizer):
    """The mask comes from the rendering, not from finding the message text: any consistent template works."""
    tok = variant(smollm2_tokenizer, None)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert supervised_runs(tokenize_conversation(tok, CHAT)) == ["HELLO! HOW CAN I HELP?<|im_end|>", "4<|im_end|>"]
