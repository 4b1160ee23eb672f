"""Parameter groups, learning-rate schedules and the time budget."""

from __future__ import annotations

import math

import pytest

from draftforge.config import TrainConfig
from draftforge.draft.model import Eagle3Draft
from draftforge.train.optim import build_optimizer, lr_multiplier
from draftforge.train.setup import build_training
from tests.test_draft_model import tiny_config
from tests.test_warm_start import run_config


def test_head_group_has_its_own_rate():
    draft = Eagle3Draft(tiny_config())
    opt = build_optimizer(draft, TrainConfig(lr=1e-3, head_lr_scale=0.1))
    head, body = opt.param_groups[1], opt.param_groups[0]
    assert head["lr"] == pytest.approx(1e-4) and body["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in head["params"]} == {id(draft.lm_head.weight), id(draft.norm.weight)}
    trainable = {id(p) for p in draft.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert len(build_optimizer(draft, TrainConfig(lr=1e-3)).param_groups) == 1  # older checkpoints' layout


def test_cosine_is_unchanged_and_schedules_end_where_asked():
    old = lambda s: (s + 1) / 10 if s < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, (s - 10) / 90)))  # noqa: E731
    assert all(lr_multiplier(s, 10, 100) == pytest.approx(old(s)) for s in range(120))
    assert lr_multiplier(100, 10, 100, "linear", 0.0) == 0.0
    assert lr_multiplier(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(50, 10, 100, "constant") == 1.0
    # warmup-stable-decay: flat until the last 20 %, then linear to min_ratio at the last step
    wsd = [lr_multiplier(s, 10, 100, "wsd", 0.0, 0.2) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[99] == 0.0 and all(a > b for a, b in zip(wsd[79:], wsd[80:], strict=False))
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 1, 10, "exp")


def test_time_budget_fixes_the_step_count_and_resume_keeps_it(tmp_path, tiny_target_dir, small_conversations,
                                                             isolated_cache):
    overrides = ["train.budget_minutes=0.05", "train.max_steps=10000", "train.warmup_steps=3", "train.save_every=2",
                 "train.schedule=linear"]
    trainer = build_training(run_config(tiny_target_dir, small_conversations, tmp_path / "run", *overrides))
    trainer.fit(progress=False)
    steps = trainer.total_steps
    assert trainer.budget_set and 4 < steps < 10000 and trainer.step == steps
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(3e-3 * 0.1)  # decayed to min_lr_ratio at the end

    again = build_training(run_config(tiny_target_dir, small_conversations, tmp_path / "run", *overrides))
    assert again.resume() and again.total_steps == steps and again.budget_set


def test_a_time_budget_is_remeasured_when_steps_slow_down(tmp_path, tiny_target_dir, small_conversations,
                                                          isolated_cache, monkeypatch):
    """Steps that take 1 s while the count is first fixed and 2 s after it: re-measuring during the first
    half keeps the steps within the budget (fixed once, they would take about 1.8x it). A step clock
    stands in for the wall clock, so the test does not depend on the machine's speed."""
    from draftforge.train import trainer as trainer_module

    overrides = ["train.budget_minutes=1", "train.max_steps=10000", "train.warmup_steps=3", "train.log_every=2",
                 "train.schedule=linear", "train.eval_every=0", "train.save_every=1000"]
    trainer = build_training(run_config(tiny_target_dir, small_conversations, tmp_path / "run", *overrides))
    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    train_step = trainer.train_step

    def timed_step():
        metrics = train_step()
        clock[0] += 1.0 if trainer.step <= 5 else 2.0
        return metrics

    trainer.train_step = timed_step
    trainer.fit(progress=False)
    assert trainer.step == trainer.total_steps
    assert 54 <= clock[0] <= 64, f"{trainer.step} steps took {clock[0]:.0f} s of a 60 s budget"
