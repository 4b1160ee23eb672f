"""AdamW on fp32 master weights with linear warmup and cosine decay."""

from __future__ import annotations

import math

import torch


def build_optimizer(
    params, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Multiplier of the base lr at an optimizer step: linear warmup, cosine to min_ratio."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))
