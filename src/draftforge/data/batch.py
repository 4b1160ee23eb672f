"""A right-padded batch of tokenised samples and the rows its teacher reads: what the trainer steps
on and what `capture` runs through the target, so both take it from here, below either."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def teacher_row_mask(loss_mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """bool, loss_mask's shape [..., L]: the indices u whose next token x[u+1] is a valid assistant
    token, i.e. the target rows the teacher reads. TTT step k supervises index u - 1 - k of each."""
    nxt = loss_mask[..., 1:].bool()
    if attention_mask is not None:
        nxt = nxt & attention_mask[..., 1:].bool()
    rows = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    rows[..., :-1] = nxt
    return rows


@dataclass
class Batch:
    index: torch.Tensor  # [B] sample indices in the dataset
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def step_counts(self, steps: int) -> torch.Tensor:
        """[steps] loss-masked tokens each TTT step predicts: step k predicts index t + 2 + k.
        Known before any forward, so a step's objective can be normalised by its global count. A
        target whose teacher argmax falls outside the draft vocabulary is counted but adds no loss."""
        rows = teacher_row_mask(self.loss_mask, self.attention_mask)
        return torch.stack([rows[:, 1 + k :].sum() for k in range(steps)])


def collate(dataset, indices: Sequence[int]) -> Batch:
    """Right-pad samples to the longest in the batch (padding keys then only follow valid ones)."""
    items = [dataset[i] for i in indices]
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = it["input_ids"]
        attn[row, :n] = 1
        loss[row, :n] = it["loss_mask"]
    return Batch(torch.tensor(list(indices)), ids, attn, loss)
