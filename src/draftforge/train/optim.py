"""AdamW on fp32 master weights in two parameter groups, and the learning-rate schedules.

The head group (lm_head and the final norm) has its own learning rate: when those tensors start
as the target's own output layer (`draft.head_from_target`), the base rate would erase that start
within a hundred steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from draftforge.config import TrainConfig

HEAD_PARAMS = ("lm_head.weight", "norm.weight")  # the draft's output layer (names in Eagle3Draft)
SCHEDULES = ("cosine", "linear", "wsd", "constant")


def build_optimizer(draft: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Trainable parameters in groups "body" (lr) and "head" (lr * head_lr_scale); one group when the
    rates are equal (the layout of checkpoints written before the head had its own rate)."""
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n in HEAD_PARAMS]
    body = [p for n, p in named if n not in HEAD_PARAMS]
    if cfg.head_lr_scale == 1.0 or not head:
        groups = [{"params": [p for _, p in named]}]
    else:
        groups = [{"params": body}, {"params": head, "lr": cfg.lr * cfg.head_lr_scale}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, foreach=True)


def wsd_decay_start(total: int, warmup: int, decay_fraction: float) -> int:
    """The first step whose learning rate decays in a warmup-stable-decay run of `total` steps."""
    return max(warmup, total - math.ceil(decay_fraction * total))


def lr_multiplier(step: int, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `total`: linear warmup, then
    cosine or linear to `min_ratio`, constant, or warmup-stable-decay (constant, then linear to
    `min_ratio` over the last `decay_fraction` of the steps: the length of a run can be chosen late)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = wsd_decay_start(total, warmup, decay_fraction)
        progress = min(1.0, max(0, step + 1 - start) / max(1, total - start))
        return 1 - (1 - min_ratio) * progress
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1 - (1 - min_ratio) * progress
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """`total()` is read at every step: a time budget fixes the step count after the run has started."""
    def f(step: int) -> float:
        return lr_multiplier(step, cfg.warmup_steps, total(), cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
