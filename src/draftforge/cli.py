"""The one `draftforge` command.

Each subcommand lives in the module that owns its idea and exposes `add_arguments(parser)` and
`run(args) -> int`. Only the chosen module is imported, so `draftforge --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from draftforge.config import ConfigError

# name -> (module, one-line help). Order is the pipeline order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "recipe": ("draftforge.recipe", "write a training recipe for a target from its config.json, or --check recipes"),
    "prepare": ("draftforge.data.conversations", "normalise conversation data to JSONL, with a rejects file"),
    "regenerate": ("draftforge.data.regenerate", "replace assistant turns with the target's answers from a server"),
    "inspect": ("draftforge.data.inspect", "show a tokenised sample with its supervised tokens highlighted"),
    "vocab": ("draftforge.data.vocab", "select the draft vocabulary (d2t / t2d) from assistant tokens"),
    "capture": ("draftforge.features.capture", "run the target once and write a feature store for offline training"),
    "train": ("draftforge.train.command", "train an EAGLE-3 or DFlash draft (online target, or a feature store)"),
    "export": ("draftforge.export.formats", "export a checkpoint for SGLang / vLLM, or --check a draft dir"),
    "eval": ("draftforge.eval.command", "measure acceptance length and speedup with the built-in decoder"),
    "serve": ("draftforge.serving.serve", "start a local vLLM / SGLang server for a target, with or without a draft"),
    "bench": ("draftforge.eval.bench", "benchmark a served draft: throughput, latency, acceptance, speedup"),
    "bundle": ("draftforge.bundle", "the draft bundle table; --run NAME reproduces a measured row"),
    "demo": ("draftforge.demo", "run the whole pipeline on SmolLM2-135M-Instruct and packaged ShareGPT"),
}


def _top_parser() -> argparse.ArgumentParser:
    epilog = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="draftforge",
        description="Train EAGLE-3 speculative-decoding drafts and export them for SGLang and vLLM.",
        epilog="commands:\n" + epilog + "\n\nRun `draftforge COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while a command runs, so `with` blocks, `finally` and atexit stop
    what it started: an engine server runs in its own process group and outlives a process that
    SIGTERM kills outright. Under torchrun every rank unwinds and leaves its process group."""
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # prints help or a clear "invalid choice" error
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(
        prog=f"draftforge {name}",
        description=(module.__doc__ or COMMANDS[name][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        with _sigterm_exits():
            return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"draftforge {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
