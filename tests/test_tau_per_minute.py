"""benchmarks/tau_per_minute.py reads a run's held-out evaluations as (minutes, cond τ) points."""

import json
from pathlib import Path

import pytest

from tests.conftest import load_script


def _module():
    return load_script("tau_per_minute")


def _write(run: Path, rows: list[dict]) -> Path:
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


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
