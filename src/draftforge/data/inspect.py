"""Show one tokenised sample with its supervised tokens highlighted: check the mask before training.

Supervised tokens are on a green background, the rest is dimmed; with --plain (the default when stdout
is not a terminal) supervised runs are wrapped in [[ ]]. The counts of supervised and masked tokens follow
the header. --tokens lists every token: position, id, mask bit and text.
"""

from __future__ import annotations

import argparse
import sys

from draftforge.data.conversations import Row, iter_conversations
from draftforge.data.template import Sample, TemplateError, load_tokenizer, tokenize_row
from draftforge.data.tokenized import add_data_arguments, data_config_from_args

SUPERVISED, MASKED, RESET = "\x1b[30;42m", "\x1b[2m", "\x1b[0m"


def format_sample(sample: Sample, color: bool) -> str:
    """The rendered text of the kept tokens, supervised runs highlighted (ANSI) or bracketed (plain)."""
    runs: list[tuple[int, str]] = []
    end = 0
    for bit, (_, b) in zip(sample.loss_mask, sample.offsets, strict=True):
        piece = sample.text[end:max(end, b)]
        end = max(end, b)
        if runs and runs[-1][0] == bit:
            runs[-1] = (bit, runs[-1][1] + piece)
        else:
            runs.append((bit, piece))
    if color:
        return "".join(f"{SUPERVISED if bit else MASKED}{text}{RESET}" for bit, text in runs)
    return "".join(f"[[{text}]]" if bit else text for bit, text in runs)


def format_tokens(sample: Sample) -> str:
    return "\n".join(f"{i:>6} {token:>7} {bit} {sample.text[a:b]!r}"
                     for i, (token, bit, (a, b)) in enumerate(zip(sample.input_ids, sample.loss_mask, sample.offsets,
                                                                   strict=True)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, building=False)
    parser.add_argument("--index", type=int, default=0, help="which conversation (0-based, among the usable ones)")
    parser.add_argument("--plain", action="store_true", help="no colours: supervised runs in [[ ]]")
    parser.add_argument("--tokens", action="store_true", help="also list every token")


def run(args: argparse.Namespace) -> int:
    data_cfg = data_config_from_args(args)
    rows = (item for item in iter_conversations(args.data) if isinstance(item, Row))
    row = next((r for i, r in enumerate(rows) if i == args.index), None)
    if row is None:
        print(f"error: no usable conversation at index {args.index} in {', '.join(args.data)}", file=sys.stderr)
        return 1
    try:
        sample = tokenize_row(load_tokenizer(args.tokenizer), row.data, data_cfg)
    except TemplateError as e:
        print(f"error: conversation {row.data['id']!r} ({row.source}:{row.line}) is rejected: {e}", file=sys.stderr)
        return 1
    total, supervised = len(sample.input_ids), sample.num_supervised
    truncated = f", truncated at {data_cfg.max_length}" if sample.truncated else ""
    print(f"conversation {row.data['id']!r} ({row.source}:{row.line}): {total} tokens, {supervised} supervised, "
          f"{total - supervised} masked{truncated}")
    print(format_sample(sample, color=not args.plain and sys.stdout.isatty()))
    if sample.truncated:
        print(f"... (the rest of the conversation is cut off at {data_cfg.max_length} tokens)")
    if args.tokens:
        print(format_tokens(sample))
    return 0
