"""Atomic, resumable checkpoints: a directory per step, written aside and renamed into place.

A crash mid-save leaves only a `*.tmp` directory that readers ignore and the next save removes,
never a broken latest checkpoint. Readers never delete anything: a reader (an export, a test
polling for checkpoints) cannot tell a leftover from a save in progress. Weights are safetensors;
optimizer state is a torch file read back with `weights_only=True`, so loading never runs code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """The RNG streams a step may draw from (data order is seeded separately, per epoch)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically and prune to the last `keep_last`."""
    ckpt_root = Path(root) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    for leftover in ckpt_root.glob("*.tmp"):  # interrupted saves; this process is the only writer
        shutil.rmtree(leftover)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `*.tmp` save in progress or interrupted is not one)."""
    ckpt_root = Path(root) / "checkpoints"
    if not ckpt_root.exists():
        return []
    return sorted(p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of one checkpoint directory (step, total_steps, config, ...), without its tensors."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, {"optimizer", "rng"}, trainer state) of one checkpoint directory."""
    path = Path(path)
    model_state = load_file(path / "model.safetensors")
    extra = torch.load(path / "optimizer.pt", weights_only=True)
    return model_state, extra, trainer_state(path)
