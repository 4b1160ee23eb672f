"""The held-out split: which samples the trainer keeps for its eval set, and `eval --suite heldout:`
replays. One hash of the sample id decides, so the split survives the data growing or being reordered
and both readers agree without sharing state."""

from __future__ import annotations

import hashlib

import numpy as np


def is_heldout(row_id: str, fraction: float = 0.02) -> bool:
    """Whether a sample is held out: sha1(id)'s first 8 hex digits, as a share of 2^32 - 1, below `fraction`."""
    return int(hashlib.sha1(str(row_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def split_eval(ids: list[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of `ids`; everything trains when `fraction` <= 0."""
    if fraction <= 0:
        return np.arange(len(ids)), np.arange(0)
    held = np.array([is_heldout(i, fraction) for i in ids], dtype=bool)
    return np.nonzero(~held)[0], np.nonzero(held)[0]
