"""What `export --check` reports, and the check every draft family shares: its vocabulary mapping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


@dataclass
class Finding:
    level: str  # "error": an engine rejects or silently misreads it; "warning": one engine build misreads it;
    # "note": worth knowing
    message: str


def tensor_layout(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in safetensors files, read from their headers only."""
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                tensors[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return tensors


def check_vocab_map(files: list[Path], cfg: Any) -> list[Finding]:
    """d2t / t2d of a draft dir (any family: `cfg` has draft_vocab_size and vocab_size) agree."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in ("d2t", "t2d"):
                if name in fh.keys():
                    tensors[name] = fh.get_tensor(name)
    ids = tensors["d2t"].long() + torch.arange(cfg.draft_vocab_size)
    problems = []
    if ids.min() < 0 or ids.max() >= cfg.vocab_size or (ids[1:] <= ids[:-1]).any():
        problems.append(Finding("error", "d2t does not map to strictly increasing target ids (d2t[i] = id_i - i)"))
    elif not torch.equal(torch.nonzero(tensors["t2d"]).flatten(), ids):
        problems.append(Finding("error", "t2d does not mark exactly the target ids listed by d2t"))
    return problems
