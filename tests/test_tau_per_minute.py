"""benchmarks/tau_per_minute.py reads a run's held-out evaluations as (minutes, cond τ) points."""

import json
from pathlib import Path

import pytest

from draftforge.train.optim import wsd_decay_start
from tests.conftest import load_script


def _module():
    return load_script("tau_per_minute")


def _write(run: Path, rows: list[dict]) -> Path:
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _tiny(target_dir: Path, conversations: Path) -> list[str]:
    """Overrides that train the tiny target's draft for a few seconds a budget."""
    return [f"target.path={target_dir}", f"data.sources=[{conversations}]", "target.dtype=float32",
            "data.max_length=128", "data.eval_fraction=0.2", "draft.draft_vocab_size=2000", "train.precision=fp32",
            "train.ttt_steps=2", "train.tokens_per_batch=512", "train.warmup_steps=2", "train.log_every=1",
            "train.threads=1"]


def test_each_evaluation_is_a_point_at_the_runs_wall_clock_minutes(tmp_path):
    run = _write(tmp_path / "run", [
        {"step": 10, "tokens": 6000, "tok_per_s": 100.0, "loss": 1.0},
        {"step": 10, "tokens": 6000, "eval_cond_tau": 1.25, "eval_acc_0": 0.2},
        {"step": 20, "tokens": 12000, "tok_per_s": 50.0, "loss": 0.9},
        {"step": 20, "tokens": 12000, "eval_cond_tau": 1.5, "eval_acc_0": 0.3},
    ])
    points = _module().curve(run)
    assert [(p["step"], p["minutes"], p["cond_tau"]) for p in points] == [(10, 1.0, 1.25), (20, 4.0, 1.5)]


def test_a_run_without_evaluations_is_refused_by_name(tmp_path):
    run = _write(tmp_path / "run", [{"step": 10, "tokens": 6000, "tok_per_s": 100.0, "loss": 1.0}])
    with pytest.raises(SystemExit, match="no held-out evaluations"):
        _module().curve(run)


def test_budget_runs_branch_from_the_longest_and_each_ends_on_its_own_evaluation(
        tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    overrides = _tiny(tiny_target_dir, small_conversations)
    points = _module().budget_curve(None, overrides, [0.04, 0.08], tmp_path / "work", save_every=2)
    assert [p["budget_minutes"] for p in points] == [0.04, 0.08]
    longest = json.loads(sorted((tmp_path / "work" / "0.08min" / "checkpoints").iterdir())[-1]
                         .joinpath("trainer_state.json").read_text())["total_steps"]
    short = [json.loads(line) for line in (tmp_path / "work" / "0.04min" / "metrics.jsonl").read_text().splitlines()]
    assert points[0]["step"] == short[-1]["step"] == max(1, round(longest / 2)) < points[1]["step"] == longest
    start = wsd_decay_start(points[0]["step"], warmup=2, decay_fraction=0.2)
    branched_at = (start - 1) // 2 * 2  # the longest run's last checkpoint (every 2 steps) before the decay
    assert branched_at >= 2 and short[0]["step"] == branched_at + 1  # the short run trained only from there


def test_an_offline_recipe_is_captured_first_and_its_points_count_the_capture(
        tmp_path, tiny_target_dir, small_conversations, isolated_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store's path is relative, as in a recipe
    overrides = [*_tiny(tiny_target_dir, small_conversations), "features.store=store", "features.store_dtype=int8"]
    [point] = _module().budget_curve(None, overrides, [0.04], Path("work"), save_every=2)
    captured = json.loads(Path("store/manifest.json").read_text())["capture_seconds"] / 60
    assert captured > 0 and point["capture_minutes"] == round(captured, 2)
    assert point["minutes"] > captured  # training time on top of the capture
