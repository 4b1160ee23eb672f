"""Tokenise a conversation with the target's own chat template and find the assistant-only loss mask.

No per-model regexes: the mask comes from the template itself, so it works for any template.
- Diff (default): the rendering of the prefix that ends before assistant turn i with the generation
  prompt, and of the prefix that ends after it, bound its span in the full rendering: exactly its
  content and end-of-turn token(s), none of the headers. Templates that render a turn differently once
  later turns exist (Qwen3 drops earlier reasoning) make a prefix differ from the full text by extra
  blocks; the prefix is aligned by skipping them, and the span is then checked to hold the content.
- Markers: templates with `{% generation %}` blocks report the assistant spans themselves.
Both give character spans in the full rendering; whitespace after the end-of-turn token is not
supervised, and with think="mask" a leading empty `<think></think>` block is not either. The full text is
tokenised once and a token is supervised when its characters overlap a span.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from draftforge import assets
from draftforge.config import DataConfig

THINK_MODES = ("mask", "train")
METHODS = ("auto", "diff", "markers")
_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_ANCHOR = 32  # characters that must match again after a skipped block


class TemplateError(ValueError):
    """A conversation that cannot become a training sample; `reason` is its reject code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]
    text: str  # the full rendering, before truncation
    offsets: list[tuple[int, int]]  # character span of each kept token in `text`
    truncated: bool

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)


def load_tokenizer(name: str) -> Any:
    """A tokenizer by path or hub id; "smollm2" is the packaged SmolLM2-135M-Instruct."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.resolve_model_path(name))


def render(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # templates raise anything (raise_exception, TypeError on odd fields, ...)
        raise TemplateError("template_error", f"the chat template failed: {e}") from e


def _common_prefix(a: str, i: int, b: str, j: int) -> int:
    """Length of the common prefix of a[i:] and b[j:] (binary search on C-level slice compares)."""
    lo, hi = 0, min(len(a) - i, len(b) - j)
    if a.startswith(b[j:j + hi], i):
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[i:i + mid] == b[j:j + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def align_end(prefix: str, full: str) -> int | None:
    """Where `prefix` ends inside `full`, skipping blocks that `prefix` has and `full` leaves out.

    Greedy: match as far as possible, then skip the shortest stretch of `prefix` after which the next
    _ANCHOR characters (fewer at the very end) match again. None when no alignment exists.
    """
    if full.startswith(prefix):
        return len(prefix)
    i = j = 0
    while True:
        k = _common_prefix(prefix, i, full, j)
        i, j = i + k, j + k
        if i == len(prefix):
            return j
        for skip in range(1, len(prefix) - i):
            n = min(_ANCHOR, len(prefix) - i - skip)
            if j + n <= len(full) and prefix.startswith(full[j:j + n], i + skip):
                i += skip
                break
        else:
            return None


def _content_probe(message: dict[str, Any]) -> str:
    """The end of the content as a template renders it (stripped, reasoning split off)."""
    content = message.get("content") or ""
    return content.split("</think>")[-1].strip()[-_ANCHOR:]


def _diff_spans(tokenizer: Any, messages: list[dict[str, Any]], tools: list | None,
                full: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("template_mismatch", "an assistant turn with nothing before it")
        before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        after = render(tokenizer, messages[:i + 1], tools=tools)
        start, end = align_end(before, full), align_end(after, full)
        if start is None or end is None or end < start or (spans and start < spans[-1][1]):
            raise TemplateError("template_mismatch",
                                f"cannot locate assistant turn {i} in the rendering (the template renders "
                                "earlier turns differently once later ones exist); try a template with "
                                "{% generation %} markers")
        if end == start:  # the template does not render this turn: nothing to supervise
            continue
        # Blocks were skipped to align: check the span holds the answer (a template may render only the tool
        # calls of a turn that has them, so those turns cannot be checked this way).
        aligned = full.startswith(before) and full.startswith(after)
        if not aligned and "tool_calls" not in message and _content_probe(message) not in full[start:end]:
            raise TemplateError("template_mismatch", f"assistant turn {i}: its content is not in its located span")
        spans.append((start, end))
    return spans


def _marker_spans(tokenizer: Any, messages: list[dict[str, Any]], tools: list | None) -> list[tuple[int, int]]:
    """Spans from the template's `{% generation %}` blocks, via transformers' assistant token mask."""
    try:
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True,
                                            tokenizer_kwargs={"return_offsets_mapping": True})
    except Exception as e:
        raise TemplateError("template_error", f"the chat template failed: {e}") from e
    spans: list[tuple[int, int]] = []
    previous = 0
    for bit, (a, b) in zip(out["assistant_masks"], out["offset_mapping"], strict=True):
        if bit and previous:
            spans[-1] = (spans[-1][0], b)
        elif bit:
            spans.append((a, b))
        previous = bit
    return spans


def _trim(full: str, span: tuple[int, int], think: str) -> tuple[int, int]:
    """Drop whitespace after the end-of-turn token and, with think="mask", a leading empty think block."""
    start, end = span
    while end > start and full[end - 1].isspace():
        end -= 1
    if think == "mask" and (m := _EMPTY_THINK.match(full, start, end)):
        start = m.end()
    return start, end


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], *, tools: list | None = None,
                    think: str = "mask", method: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character span of each assistant turn (content + end-of-turn)."""
    if think not in THINK_MODES:
        raise ValueError(f"think must be one of {THINK_MODES}, got {think!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ValueError("the tokenizer has no (single) chat template; set tokenizer.chat_template")
    if method == "auto":
        method = "markers" if _GENERATION.search(template) else "diff"
    full = render(tokenizer, messages, tools=tools)
    if method == "markers":
        spans = _marker_spans(tokenizer, messages, tools)
    else:
        spans = _diff_spans(tokenizer, messages, tools, full)
    return full, [s for s in (_trim(full, span, think) for span in spans) if s[1] > s[0]]


def _token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span (offsets are sorted)."""
    mask = [0] * len(offsets)
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    for s, e in spans:
        for t in range(bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)):
            mask[t] = 1
    return mask


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, Any]], *, max_length: int | None = None,
                          system_prompt: str | None = None, last_turn_only: bool = False, think: str = "mask",
                          tools: list | None = None, method: str = "auto") -> Sample:
    """input_ids and assistant-only loss_mask of one conversation. Raises TemplateError."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer (with offsets) is needed to map the mask onto tokens")
    full, spans = assistant_spans(tokenizer, messages, tools=tools, think=think, method=method)
    if not spans:
        raise TemplateError("empty_mask", "no supervised tokens: the template renders no assistant content")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    mask = _token_mask(offsets, spans[-1:] if last_turn_only else spans)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask, offsets = ids[:max_length], mask[:max_length], offsets[:max_length]
    if not any(mask):
        raise (TemplateError("truncated_mask", f"no supervised tokens in the first {max_length} tokens") if truncated
               else TemplateError("empty_mask", "no token overlaps an assistant turn"))
    return Sample(ids, mask, full, offsets, truncated)


def tokenize_row(tokenizer: Any, row: dict[str, Any], data_cfg: DataConfig) -> Sample:
    """tokenize_conversation with the options of a DataConfig."""
    return tokenize_conversation(tokenizer, row["conversations"], max_length=data_cfg.max_length,
                                 system_prompt=data_cfg.system_prompt, last_turn_only=data_cfg.last_turn_only,
                                 think=data_cfg.think, tools=row.get("tools"))
