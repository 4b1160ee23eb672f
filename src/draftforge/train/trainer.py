"""Train an EAGLE-3 draft with training-time test (TTT) against target features.

The trainer sees batches and a feature source; it does not know whether features come from a
live target or a store. Every step is reproducible from (config, seed, step): a run killed at any
point resumes from its latest checkpoint and continues with the same losses.

Under torchrun each of W ranks trains on its own micro-batches (distributed.py): the data position
`micro` counts global micro-batches, and of the grad_accum * W micro-batches of an optimizer step
rank r takes numbers micro + j * W + r. The objective of a step is normalised by the target count
of all of them, so W ranks with grad_accum a compute the step of one process with grad_accum a * W.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from draftforge.config import RETIRED_KEYS, RunConfig, TrainConfig
from draftforge.data.batch import Batch, collate
from draftforge.draft.model import Eagle3Draft
from draftforge.target.base import TargetFeatures, TargetHead
from draftforge.train.batching import token_budget_batches
from draftforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from draftforge.train.distributed import Dist, full_params, full_state, grad_sync, load_full_state, local, parallelize
from draftforge.train.loss import step_weights
from draftforge.train.optim import build_optimizer, build_scheduler, lr_multiplier
from draftforge.train.ttt import TTTOutput, ttt_forward, ttt_metrics, ttt_objective

# Settings that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = {
    "train.out_dir", "train.threads", "train.log_every", "train.eval_every", "train.eval_max_samples",
    "train.save_every", "train.keep_last", "train.fsdp", "train.target_tp", "data.num_workers",
}
# may change where the learning rates so far are the same (Trainer.same_rates_so_far)
LENGTH_KEYS = ("train.max_steps", "train.epochs", "train.budget_minutes")


FeatureFn = Callable[[Batch], TargetFeatures]


def flat_config(config: RunConfig) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in config.to_dict().items() for k, v in sec.items()}


def config_changes(old: dict[str, Any], new: dict[str, Any], allowed: Collection[str] = ()) -> list[str]:
    """What differs between a run's recorded flat config and this one, beyond RESUMABLE_CHANGES and
    `allowed`; keys retired since the run (RETIRED_KEYS) are not differences, and a key added since is
    read as its default there (a new setting's default keeps what older runs computed)."""
    old = {**flat_config(RunConfig()), **old}
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RESUMABLE_CHANGES and k not in RETIRED_KEYS and k not in allowed
        and json.dumps(_comparable(k, old.get(k))) != json.dumps(_comparable(k, new.get(k)))
    ]


def _comparable(key: str, value: Any) -> Any:
    """A setting as resume compares it: data sources as the files they name, so a path written relative
    or absolute is the same source (`bundle --run` names the shipped data absolutely; a recipe
    relatively). Contents are checked apart, by the run's data identity."""
    if key != "data.sources":
        return value
    return [str(Path(s).resolve()) if Path(s).exists() else s for s in value or []]


class TTTModel(nn.Module):
    """The TTT unroll of the draft as a module forward: DDP and FSDP2 act on calls of the wrapped
    module's forward, and the unroll calls the draft's parts directly, not its forward."""

    def __init__(self, draft: Eagle3Draft, head: TargetHead, cfg: TrainConfig) -> None:
        super().__init__()
        self.draft, self.head, self.cfg = draft, head, cfg

    def unroll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
               aux: torch.Tensor, final_hidden: torch.Tensor) -> TTTOutput:
        return ttt_forward(
            self.draft, input_ids, attention_mask, loss_mask, aux, final_hidden, self.head.weight,
            steps=self.cfg.ttt_steps, attention=self.cfg.attention, checkpoint=self.cfg.gradient_checkpointing,
            logit_softcap=self.head.logit_softcap,
        )

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.unroll(*inputs)  # plain tensors out: FSDP2 hooks its backward onto them
        return out.loss_sum, out.correct, out.count, out.chain, out.chain_base

    # What the Trainer asks of any draft family's objective (DFlash's: train/dflash_objective.py).
    @property
    def positions(self) -> int:
        """Metric slots: the TTT steps."""
        return self.cfg.ttt_steps

    @property
    def decay(self) -> float:
        return self.cfg.step_decay

    def prepare(self, batch: Batch, train: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(inputs of the forward besides the batch's tokens and features, per-slot target counts)."""
        return [], batch.step_counts(self.cfg.ttt_steps)

    def objective(self, out: TTTOutput, targets: torch.Tensor) -> torch.Tensor:
        return ttt_objective(out, targets, self.cfg.step_decay)


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
        dist: Dist | None = None,
        objective: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.train
        self.dist = dist or Dist()
        self.draft = draft
        self.head = head
        self.features = features
        self.train_set = train_set
        self.eval_set = eval_set
        self.identity = identity or {}  # what the data and target are; a resume must match it
        self.out = Path(self.cfg.out_dir)
        self.lengths = np.asarray(train_set.lengths)
        self._epochs: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(self._epoch_batches(0))
        if self.batches_per_epoch == 0:
            raise ValueError("the training set is empty")
        self.micro_per_step = self.cfg.grad_accum * self.dist.world  # global micro-batches per optimizer step
        epochs = self.cfg.epochs
        self.step_cap = max(1, math.ceil(epochs * self.batches_per_epoch / self.micro_per_step) if epochs
                            else self.cfg.max_steps)
        self.total_steps = self.step_cap  # a time budget shortens it once the step time is measured
        self.ttt = objective if objective is not None else TTTModel(draft, head, self.cfg)  # the family's objective
        bf16 = torch.bfloat16 if self.cfg.precision == "bf16" else None
        self.model = parallelize(self.ttt, self.dist, self.cfg.fsdp, bf16)
        self.optimizer = build_optimizer(draft, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, lambda: self.total_steps)
        self.budget_set = self.cfg.budget_minutes is None  # a time budget fixes total_steps once measured
        self.step = 0  # optimizer steps done
        self.micro = 0  # global micro-batches consumed, all ranks together (data position)
        self._asked = 0  # this rank's micro-batches of the step in progress whose features were asked for
        self.tokens = 0  # target tokens trained on, all ranks together
        self._tb = None

    # ---- data order -------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            if len(self._epochs) > 1:  # keep two: read-ahead may look one epoch past the current one
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = token_budget_batches(self.lengths, self.cfg.tokens_per_batch, self.cfg.seed, epoch)
        return self._epochs[epoch]

    def _positions(self, number: int) -> list[int]:
        """Train-set positions of global micro-batch `number`. Each epoch counts as long as epoch 0; a
        reshuffled epoch can group into fewer token-budget batches, and then wraps to its first ones
        (a 60-minute SmolLM2 run crashed in its 6th epoch before)."""
        epoch, pos = divmod(number, self.batches_per_epoch)
        batches = self._epoch_batches(epoch)
        return batches[pos % len(batches)]

    def _numbers(self, first: int) -> list[int]:
        """This rank's micro-batch numbers of the optimizer step that starts at global position `first`."""
        return [first + j * self.dist.world + self.dist.rank for j in range(self.cfg.grad_accum)]

    def upcoming(self, count: int) -> list[list[int]]:
        """Train-set positions of this rank's next `count` micro-batches whose features were not asked
        for yet, in order (a feature store reads them ahead)."""
        numbers, first = self._numbers(self.micro)[self._asked:], self.micro
        while len(numbers) < count:
            first += self.micro_per_step
            numbers += self._numbers(first)
        return [self._positions(n) for n in numbers[:count]]

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, batch: Batch, extra: list[torch.Tensor], train: bool) -> TTTOutput:
        """Training goes through the (wrapped) module forward, evaluation straight to the unroll. `extra`:
        the objective's own inputs from `prepare` (none for TTT, the block anchors for DFlash)."""
        feats = self.features(batch)
        inputs = [t.to(self.dist.device, non_blocking=True) for t in (
            batch.input_ids, batch.attention_mask, batch.loss_mask, *extra, feats.aux, feats.final_hidden)]
        with self._autocast():
            return TTTOutput(*self.model(*inputs)) if train else self.ttt.unroll(*inputs)

    def train_step(self) -> dict[str, Any]:
        self.draft.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = [collate(self.train_set, self._positions(n)) for n in self._numbers(self.micro)]
        prepared = [self.ttt.prepare(b) for b in batches]
        targets = self.dist.sum(torch.stack([t for _, t in prepared]).sum(0))
        stats = _Stats(self.ttt.positions, self.ttt.decay, self.dist.device)
        for j, batch in enumerate(batches):
            self._asked = j + 1
            with grad_sync(self.model, last=j == len(batches) - 1):
                out = self._forward(batch, prepared[j][0], train=True)
                self.ttt.objective(out, targets).backward()  # this rank's share of the global mean
            stats.add(out, batch.tokens)
        self.micro, self._asked = self.micro + self.micro_per_step, 0
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.draft.parameters() if p.requires_grad], self.cfg.clip_grad
        )
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        totals = stats.reduce(self.dist)
        self.tokens += totals.tokens
        return {**totals.metrics(), "grad_norm": float(local(grad_norm)), "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Metrics of the eval split, its batches shared out over the ranks. Every rank runs the same
        number of forwards (a collective feature source stays in step); a rank short of one repeats
        its last batch and drops the result."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        self.draft.eval()
        stats = _Stats(self.ttt.positions, self.ttt.decay, self.dist.device)
        batches = token_budget_batches(np.asarray(self.eval_set.lengths), self.cfg.tokens_per_batch, seed=0, epoch=0)
        rank, world = self.dist.rank, self.dist.world
        mine = list(range(rank, len(batches), world))
        turns = math.ceil(len(batches) / world)
        with full_params(self.model):
            for turn in range(turns):
                number = mine[min(turn, len(mine) - 1)] if mine else 0
                batch = collate(self.eval_set, batches[number])
                out = self._forward(batch, self.ttt.prepare(batch, train=False)[0], train=False)
                if turn < len(mine):
                    stats.add(out, batch.tokens)
        return {f"eval_{k}": v for k, v in stats.reduce(self.dist).metrics().items()}

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "budget_set": self.budget_set,
            "micro": self.micro,
            "tokens": self.tokens,
            "world_size": self.dist.world,
            "config": flat_config(self.config),
            "identity": self.identity,
            "draft_config": self.draft.config.to_dict(),
        }

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint (the others help gather sharded state); its path there."""
        weights, optim = full_state(self.draft, self.optimizer)
        if not self.dist.main:
            return None
        extra = {"optimizer": optim, "scheduler": self.scheduler.state_dict()}
        return save_checkpoint(self.out, self.step, weights, extra, self.state(), self.cfg.keep_last)

    def latest(self) -> Path | None:
        """Rank 0's latest checkpoint, on every rank (only rank 0 has the checkpoints directory for sure)."""
        return self.dist.from_main(latest_checkpoint(self.out) if self.dist.main else None)

    def same_rates_so_far(self, state: dict[str, Any]) -> bool:
        """Whether a run of this length uses the recorded run's learning rates up to its step, so going
        on with this length is exactly that run: a WSD run before its decay, or a constant schedule, may
        branch into a shorter or longer one (`train --branch-from`). The recorded run may have had a time
        budget (its length is the one it fixed); this one needs a step count."""
        if self.cfg.budget_minutes is not None:
            return False
        cfg = self.cfg
        rate = partial(lr_multiplier, warmup=cfg.warmup_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio,
                       decay_fraction=cfg.decay_fraction)
        recorded = state.get("total_steps", state["config"].get("train.max_steps"))
        return all(rate(t, total=recorded) == rate(t, total=self.total_steps) for t in range(state["step"] + 1))

    def resume(self, force: bool = False, branch_from: str | Path | None = None) -> bool:
        """Load the latest checkpoint of out_dir, or where it has none, `branch_from` (another run's
        checkpoint, whose length may differ where same_rates_so_far). Refuses a changed config, data or
        world size unless forced; every rank loads it."""
        path = self.latest() or (Path(branch_from) if branch_from else None)
        if path is None:
            return False
        weights, extra, state = load_checkpoint(path)
        length = LENGTH_KEYS if self.same_rates_so_far(state) else ()
        problems = config_changes(state["config"], flat_config(self.config), allowed=length)
        if state.get("identity") != self.identity:
            problems.append(f"data/target identity: {state.get('identity')} -> {self.identity}")
        world = state.get("world_size", 1)
        if world != self.dist.world:
            problems.append(f"world size: {world} -> {self.dist.world} ranks (an optimizer step trains on "
                            f"{self.cfg.grad_accum * world} -> {self.micro_per_step} micro-batches)")
        if problems:
            msg = f"{path} was trained with a different setup:\n  " + "\n  ".join(problems)
            if not force:
                raise SystemExit(msg + "\nUse a new train.out_dir, or --force to resume anyway.")
            self.say("warning: resuming anyway (--force). " + msg, sys.stderr)
        own = set(self.draft.state_dict()) - {"embed_tokens.weight"}
        if set(weights) != own:
            raise SystemExit(f"{path}: checkpoint does not fit the draft (missing {sorted(own - set(weights))}, "
                             f"extra {sorted(set(weights) - own)})")
        optim = extra["optimizer"]["optimizer"]
        if any(not isinstance(p, str) for g in optim["param_groups"] for p in g["params"]):
            raise SystemExit(f"{path}: optimizer state keyed by position (written before draftforge keyed it by "
                             f"parameter name), so the run cannot resume. `draftforge export` still reads it; to "
                             f"continue, export it and train into a new train.out_dir with draft.init_from=EXPORT_DIR.")
        load_full_state(self.draft, self.optimizer, weights, optim)
        self.scheduler.load_state_dict(extra["optimizer"]["scheduler"])
        set_rng_state(extra["rng"])
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        if self.cfg.budget_minutes is not None and state.get("budget_set"):
            self.total_steps, self.budget_set = state["total_steps"], True
        if hasattr(self.draft, "set_tap_scales"):  # the scales this run started with, not re-measured ones
            self.draft.set_tap_scales(state["draft_config"].get("tap_scales"))
        if length and state.get("total_steps") != self.total_steps:
            self.say(f"{path} is step {self.step} of a {state.get('total_steps')}-step run; it goes on as a "
                     f"{self.total_steps}-step run (the learning rates so far are the same)")
        self.say(f"resumed from {path} (step {self.step}, {self.tokens:,} tokens)")
        return True

    def close(self) -> None:
        """Close the TensorBoard writer (its event file and writer thread would otherwise outlive the run
        in a process that goes on, e.g. the demo's), then leave the process group. The DDP wrapper goes
        first: its C++ reducer would otherwise be the group's last owner and destroy it holding the GIL,
        which deadlocks with a gloo worker thread that still has to release a tensor (seen with torch 2.13)."""
        if self._tb:
            self._tb.close()
        self._tb = None
        self.model = self.ttt
        gc.collect()
        self.dist.close()

    # ---- loop -------------------------------------------------------------------------------
    def say(self, text: str, file: TextIO | None = None) -> None:
        """Print on the main rank only, so a message appears once however many ranks run."""
        if self.dist.main:
            print(text, file=file or sys.stdout)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
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

    def _budget_due(self, step0: int) -> bool:
        """When to (re)measure the step time under a time budget: once warmup's first steps are timed,
        then at every log step of the run's first half, as the rate settles (the first steps can run
        faster than the rest, and a count fixed on them alone overruns the budget)."""
        if self.cfg.budget_minutes is None or self.step <= step0 + 1:
            return False
        if not self.budget_set:
            return self.step == step0 + 1 + max(3, min(20, self.cfg.warmup_steps))
        return self.step % self.cfg.log_every == 0 and self.step < self.total_steps // 2

    def _fix_budget(self, seconds: float, steps: int) -> None:
        """Fix total_steps so the training steps fill train.budget_minutes at the rate measured over
        the last `steps` steps (evaluations come on top); the schedule decays to that length."""
        left = self.cfg.budget_minutes * 60 - seconds * (self.step / steps)
        total = max(self.step, min(self.step_cap, self.step + int(left / (seconds / steps))))
        if not self.budget_set or abs(total - self.total_steps) > 0.02 * self.total_steps:
            self.say(f"time budget {self.cfg.budget_minutes:g} min: {total} steps ({seconds / steps:.2f} s/step)")
        self.total_steps, self.budget_set = total, True

    def fit(self, progress: bool = True) -> dict[str, Any]:
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not progress or not self.dist.main, dynamic_ncols=True)
        last: dict[str, Any] = {}
        t0, tok0, step0, timed = time.perf_counter(), self.tokens, self.step, 0.0
        while self.step < self.total_steps:
            started = time.perf_counter()
            metrics = self.train_step()
            if self.step > step0 + 1:  # the first step of a process pays one-off costs
                timed += time.perf_counter() - started
            if self._budget_due(step0):
                self._fix_budget(self.dist.from_main(timed), self.step - step0 - 1)
                bar.total = self.total_steps
            rate = (self.tokens - tok0) / max(1e-9, time.perf_counter() - t0)
            last = {"step": self.step, "tokens": self.tokens, "tok_per_s": rate, **metrics}
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc0=f"{metrics['acc_0']:.3f}",
                            tau=f"{metrics['cond_tau']:.2f}", tok_s=f"{rate:.0f}")
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
    """Token-weighted sums over micro-batches and ranks: the metrics of a step are those of its tokens."""

    FIELDS = ("loss_sum", "correct", "count", "chain", "chain_base")  # TTTOutput's per-step sums

    def __init__(self, steps: int, decay: float, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.FIELDS), steps, dtype=torch.float64, device=device)
        self.decay, self.tokens = decay, 0

    def add(self, out: TTTOutput, tokens: int) -> None:
        self.sums += torch.stack([getattr(out, f).detach().double() for f in self.FIELDS])
        self.tokens += tokens

    def reduce(self, dist: Dist) -> _Stats:
        """In place, the sums over all ranks: exact for counts (integers far below 2^53), float64 for losses."""
        flat = dist.sum(torch.cat([self.sums.flatten(), self.sums.new_tensor([self.tokens])])).cpu()
        self.sums, self.tokens = flat[:-1].view(len(self.FIELDS), -1), int(flat[-1])
        return self

    def metrics(self) -> dict[str, Any]:
        loss_sum, correct, count, chain, chain_base = self.sums
        m = ttt_metrics(correct, count, loss_sum, chain, chain_base)
        loss = float((step_weights(len(count), self.decay, loss_sum) * loss_sum / count.clamp(min=1)).sum())
        return {"loss": loss, **m, "supervised": int(count[0])}
