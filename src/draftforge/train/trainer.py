"""Train an EAGLE-3 draft with training-time test (TTT) against target features.

The trainer sees batches and a feature source; it does not know whether features come from a
live target or a store. Every step is reproducible from (config, seed, step): a run killed at any
point resumes from its latest checkpoint and continues with the same losses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from draftforge.config import RunConfig, load_config
from draftforge.draft.model import Eagle3Draft
from draftforge.target.base import TargetFeatures, TargetHead
from draftforge.train.batching import token_budget_batches
from draftforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from draftforge.train.optim import build_optimizer, build_scheduler
from draftforge.train.ttt import ttt_forward, ttt_metrics, ttt_objective

# Settings that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = {
    "train.out_dir", "train.threads", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_last", "train.wandb", "data.num_workers",
}


@dataclass
class Batch:
    index: torch.Tensor  # [B] sample indices in the dataset
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


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


FeatureFn = Callable[[Batch], TargetFeatures]


def flat_config(config: RunConfig) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in config.to_dict().items() for k, v in sec.items()}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RESUMABLE_CHANGES and json.dumps(old.get(k)) != json.dumps(new.get(k))
    ]


class Trainer:
    """Owns the draft, its optimizer and schedule, the data order, logs and checkpoints."""

    def __init__(
        self,
        config: RunConfig,
        draft: Eagle3Draft,
        head: TargetHead,
        features: FeatureFn,
        train_set,
        eval_set=None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.train
        self.draft = draft
        self.head = head
        self.features = features
        self.train_set = train_set
        self.eval_set = eval_set
        self.identity = identity or {}  # what the data and target are; a resume must match it
        self.out = Path(self.cfg.out_dir)
        self.lengths = np.asarray(train_set.lengths)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.batches_per_epoch = len(self._epoch_batches(0))
        if self.batches_per_epoch == 0:
            raise ValueError("the training set is empty")
        micro_total = (
            self.cfg.epochs * self.batches_per_epoch if self.cfg.epochs else self.cfg.max_steps * self.cfg.grad_accum
        )
        self.total_steps = max(1, math.ceil(micro_total / self.cfg.grad_accum))
        self.optimizer = build_optimizer(draft.parameters(), self.cfg.lr, self.cfg.weight_decay, self.cfg.betas)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.warmup_steps, self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (data position)
        self.tokens = 0  # target tokens trained on
        self._tb = None

    # ---- data order -------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = token_budget_batches(self.lengths, self.cfg.tokens_per_batch, self.cfg.seed, epoch)
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def _next_batch(self) -> Batch:
        epoch, pos = divmod(self.micro, self.batches_per_epoch)
        self.micro += 1
        return collate(self.train_set, self._epoch_batches(epoch)[pos])

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "bf16":
            device = self.head.weight.device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, batch: Batch):
        feats = self.features(batch)
        with self._autocast():
            return ttt_forward(
                self.draft,
                batch.input_ids,
                batch.attention_mask,
                batch.loss_mask,
                feats.aux,
                feats.final_hidden,
                self.head.weight,
                steps=self.cfg.ttt_steps,
                attention=self.cfg.attention,
                checkpoint=self.cfg.gradient_checkpointing,
                logit_softcap=self.head.logit_softcap,
            )

    def train_step(self) -> dict[str, Any]:
        self.draft.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = _Stats()
        for _ in range(self.cfg.grad_accum):
            batch = self._next_batch()
            out = self._forward(batch)
            # Each micro-batch's objective is token-normalised; accumulation averages them.
            (ttt_objective(out) / self.cfg.grad_accum).backward()
            stats.add(out, batch.tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.draft.parameters() if p.requires_grad], self.cfg.clip_grad
        )
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += stats.tokens
        return {**stats.metrics(), "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        self.draft.eval()
        stats = _Stats()
        lengths = np.asarray(self.eval_set.lengths)
        for idx in token_budget_batches(lengths, self.cfg.tokens_per_batch, seed=0, epoch=0):
            batch = collate(self.eval_set, idx)
            stats.add(self._forward(batch), batch.tokens)
        return {f"eval_{k}": v for k, v in stats.metrics().items()}

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro": self.micro,
            "tokens": self.tokens,
            "config": flat_config(self.config),
            "identity": self.identity,
            "draft_config": self.draft.config.to_dict(),
        }

    def save(self) -> Path:
        trainable = {k: v for k, v in self.draft.state_dict().items() if k != "embed_tokens.weight"}
        optim = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return save_checkpoint(self.out, self.step, trainable, optim, self.state(), self.cfg.keep_last)

    def resume(self, force: bool = False) -> bool:
        """Load the latest checkpoint of out_dir if there is one. Refuses a changed config or data."""
        path = latest_checkpoint(self.out)
        if path is None:
            return False
        model_state, extra, state = load_checkpoint(path)
        problems = config_changes(state["config"], flat_config(self.config))
        if state.get("identity") != self.identity:
            problems.append(f"data/target identity: {state.get('identity')} -> {self.identity}")
        if problems:
            msg = f"{path} was trained with a different setup:\n  " + "\n  ".join(problems)
            if not force:
                raise SystemExit(msg + "\nUse a new train.out_dir, or --force to resume anyway.")
            print("warning: resuming anyway (--force). " + msg, file=sys.stderr)
        missing, unexpected = self.draft.load_state_dict(model_state, strict=False)
        if unexpected or set(missing) - {"embed_tokens.weight"}:
            raise SystemExit(f"{path}: checkpoint does not fit the draft (missing {missing}, extra {unexpected})")
        self.optimizer.load_state_dict(extra["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(extra["optimizer"]["scheduler"])
        set_rng_state(extra["rng"])
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        print(f"resumed from {path} (step {self.step}, {self.tokens:,} tokens)")
        return True

    # ---- loop -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def fit(self, progress: bool = True) -> dict[str, Any]:
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not progress,
                   dynamic_ncols=True)
        last: dict[str, Any] = {}
        t0, tok0 = time.perf_counter(), self.tokens
        while self.step < self.total_steps:
            metrics = self.train_step()
            rate = (self.tokens - tok0) / max(1e-9, time.perf_counter() - t0)
            last = {"step": self.step, "tokens": self.tokens, "tok_per_s": rate, **metrics}
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc0=f"{metrics['acc_0']:.3f}",
                            tau=f"{metrics['sim_tau']:.2f}", tok_s=f"{rate:.0f}")
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self._log(last)
            if self.cfg.eval_every and (self.step % self.cfg.eval_every == 0 or self.step == self.total_steps):
                ev = self.evaluate()
                if ev:
                    last.update(ev)
                    self._log({"step": self.step, "tokens": self.tokens, **ev})
            if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                self.save()
        bar.close()
        return last


class _Stats:
    """Token-weighted sums over micro-batches: the metrics of a step are those of its tokens."""

    def __init__(self) -> None:
        self.loss = self.correct = self.count = None
        self.tokens = 0

    def add(self, out, tokens: int) -> None:
        loss, correct, count = out.loss_sum.detach().float(), out.correct.float(), out.count.float()
        if self.loss is None:
            self.loss, self.correct, self.count = loss, correct, count
        else:
            self.loss, self.correct, self.count = self.loss + loss, self.correct + correct, self.count + count
        self.tokens += tokens

    def metrics(self) -> dict[str, Any]:
        m = ttt_metrics(self.correct, self.count, self.loss)
        steps = len(self.count)
        weights = torch.tensor([0.8**k for k in range(steps)])
        loss = float((weights * self.loss / self.count.clamp(min=1)).sum())
        return {"loss": loss, **m, "supervised": int(self.count[0])}


# ---- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see recipes/); defaults train SmolLM2 on ShareGPT")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 train.lr=1e-4")
    parser.add_argument("--force", action="store_true", help="resume even if config or data changed")
    parser.add_argument("--no-resume", action="store_true", help="refuse to start if out_dir has checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")


def run(args: argparse.Namespace) -> int:
    from draftforge.train.setup import build_training

    config = load_config(args.config, args.overrides)
    trainer = build_training(config)
    if latest_checkpoint(config.train.out_dir) is not None and args.no_resume:
        raise SystemExit(f"{config.train.out_dir} already has checkpoints (--no-resume given)")
    trainer.resume(force=args.force)
    final = trainer.fit(progress=not args.no_progress and os.environ.get("DRAFTFORGE_NO_PROGRESS") is None)
    print(json.dumps({k: v for k, v in final.items() if not isinstance(v, list)}, indent=1))
    return 0
