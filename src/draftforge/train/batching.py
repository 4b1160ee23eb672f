"""Token-budget batches grouped by length, so little compute is spent on padding.

The order is a pure function of (seed, epoch): a resumed run replays exactly the same batches and
skips the ones it already trained on.
"""

from __future__ import annotations

import numpy as np


def token_budget_batches(
    lengths: np.ndarray, tokens_per_batch: int, seed: int, epoch: int, group: int = 64
) -> list[list[int]]:
    """Shuffle, sort within windows of `group` batches' worth of samples, pack under the budget.

    Each batch satisfies len(batch) * max_len(batch) <= tokens_per_batch (a single longer sample
    forms a batch alone). Batches are shuffled so lengths are mixed across steps.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    mean_len = max(1, int(lengths.mean())) if len(lengths) else 1
    window = max(1, group * max(1, tokens_per_batch // mean_len))
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batch: list[int] = []
        longest = 0
        for i in chunk:
            n = int(lengths[i])
            if batch and max(longest, n) * (len(batch) + 1) > tokens_per_batch:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(int(i))
            longest = max(longest, n)
        if batch:
            batches.append(batch)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]
