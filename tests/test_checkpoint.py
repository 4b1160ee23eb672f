"""Checkpoints are atomic: a crash in the middle of a save never breaks the latest good one."""

import pytest
import torch

import draftforge.train.checkpoint as ckpt


def _save(root, step, value):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((4,), float(value))}, {"step": step},
                                {"step": step}, keep_last=2)


def test_crash_mid_save_keeps_latest_good(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)

    real_save = torch.save

    def crash(*args, **kwargs):  # weights are written, the optimizer state is not: then the process dies
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("injected crash")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, 3.0)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "step_00000003.tmp").exists()

    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000002"
    weights, extra, state = ckpt.load_checkpoint(latest)
    assert torch.equal(weights["w"], torch.full((4,), 2.0)) and state["step"] == 2
    assert (tmp_path / "checkpoints" / "step_00000003.tmp").exists()  # a reader deletes nothing
    _save(tmp_path, 3, 3.0)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the next save cleans up


def test_keep_last_and_rng_round_trip(tmp_path):
    for step in range(1, 5):
        _save(tmp_path, step, step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    torch.manual_seed(3)
    _, extra, _ = ckpt.load_checkpoint(_save(tmp_path, 5, 5))
    expected = torch.rand(3)
    ckpt.set_rng_state(extra["rng"])
    assert torch.equal(torch.rand(3), expected)
