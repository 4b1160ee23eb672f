"""Trainer: exact resume after SIGKILL, refusal of a changed setup, and a learning draft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draftforge.config import ConfigError, load_config
from draftforge.train.checkpoint import latest_checkpoint
from tests.conftest import kill_after_checkpoint


def train_args(target: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "draftforge.cli", "train", "--no-progress",
        f"target.path={target}", f"data.sources=[{data}]", "target.dtype=float32", "data.max_length=128",
        "data.eval_fraction=0", "draft.draft_vocab_size=2000", "train.precision=fp32", "train.ttt_steps=3",
        "train.tokens_per_batch=512", "train.max_steps=10", "train.warmup_steps=2", "train.save_every=1",
        "train.keep_last=3", "train.log_every=1", "train.eval_every=0", "train.threads=1", "train.lr=3e-3",
        f"train.out_dir={out}", *extra,
    ]


def losses(out: Path) -> dict[int, str]:
    """Last logged loss per step, as its exact JSON text (bit-identity, not closeness)."""
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = json.dumps([record["loss"], record["acc_0"], record["grad_norm"]])
    return by_step


@pytest.fixture
def env(isolated_cache):
    return {**os.environ, "DRAFTFORGE_CACHE": str(isolated_cache), "PYTHONUNBUFFERED": "1"}


def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_target_dir, small_conversations, env):
    straight = tmp_path / "straight"
    done = subprocess.run(train_args(tiny_target_dir, small_conversations, straight), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 11))

    killed = tmp_path / "killed"
    stopped_at = kill_after_checkpoint(train_args(tiny_target_dir, small_conversations, killed), env, killed, step=4)
    assert stopped_at < 10, "the run finished before it could be killed"

    subprocess.run(train_args(tiny_target_dir, small_conversations, killed), env=env, check=True,
                   capture_output=True)
    assert losses(killed) == expected
    assert (killed / "checkpoints" / "step_00000010").exists()


def test_resume_refuses_changed_config(tmp_path, tiny_target_dir, small_conversations, env):
    out = tmp_path / "run"
    args = train_args(tiny_target_dir, small_conversations, out, "train.max_steps=2")
    subprocess.run(args, env=env, check=True, capture_output=True)
    changed = subprocess.run(args + ["train.lr=1e-4", "train.max_steps=3"], env=env, capture_output=True, text=True)
    assert changed.returncode != 0
    assert "train.lr" in changed.stderr and "--force" in changed.stderr
    forced = subprocess.run(args + ["train.lr=1e-4", "train.max_steps=3", "--force"], env=env,
                            capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert "resuming anyway" in forced.stderr


def test_a_wsd_run_branches_into_exactly_the_shorter_run(tmp_path, tiny_target_dir, small_conversations, env):
    """Before its decay a WSD run has used the rates of any run that long or longer, so its checkpoint
    continued as a 10-step run is the 10-step run, to the bit; past the 10-step run's decay start, refused."""
    wsd = ("train.schedule=wsd", "train.decay_fraction=0.2", "train.keep_last=0")  # 10 steps: decay from step 8
    straight, long, branch = (tmp_path / name for name in ("straight", "long", "branch"))
    for out, steps in ((straight, 10), (long, 12)):
        subprocess.run(train_args(tiny_target_dir, small_conversations, out, *wsd, f"train.max_steps={steps}"),
                       env=env, check=True, capture_output=True)
    args = train_args(tiny_target_dir, small_conversations, branch, *wsd, "train.max_steps=10")
    late = subprocess.run([*args, "--branch-from", str(long / "checkpoints" / "step_00000009")], env=env,
                          capture_output=True, text=True)
    assert late.returncode != 0 and "train.max_steps: 12 -> 10" in late.stderr
    done = subprocess.run([*args, "--branch-from", str(long / "checkpoints" / "step_00000006")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 6 of a 12-step run; it goes on as a 10-step run" in done.stdout + done.stderr
    expected = losses(straight)
    assert losses(branch) == {step: expected[step] for step in range(7, 11)}
    assert losses(long)[9] == expected[9] and losses(long)[10] != expected[10]  # step 9 is the last rate they share


def test_a_retired_key_neither_blocks_a_resume_nor_an_old_config(tmp_path, tiny_target_dir, small_conversations, env):
    """`train.wandb` (read by nothing) is gone: a run that recorded it resumes, a file that sets it loads."""
    out = tmp_path / "run"
    args = train_args(tiny_target_dir, small_conversations, out, "train.max_steps=1")
    subprocess.run(args, env=env, check=True, capture_output=True)
    state_file = latest_checkpoint(out) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["train.wandb"] = False  # what a run from before the key's removal recorded
    del state["config"]["train.schedule"], state["config"]["draft.head_from_target"]  # ... and before these existed
    state_file.write_text(json.dumps(state))
    resumed = subprocess.run(args, env=env, capture_output=True, text=True)  # the setup check runs first
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "different setup" not in resumed.stderr and sorted(losses(out)) == [1]

    recipe = tmp_path / "old.yaml"
    recipe.write_text("train:\n  wandb: true\n  lr: 0.001\n")
    config = load_config(recipe, ["train.wandb=false"])
    assert config.train.lr == 0.001 and not hasattr(config.train, "wandb")
    with pytest.raises(ConfigError, match="unknown key train.wandbb"):
        load_config(None, ["train.wandbb=true"])  # a typo is still an error


def test_a_key_added_since_a_run_is_its_default_there():
    from draftforge.train.trainer import config_changes, flat_config

    new = flat_config(load_config(None, ["train.lr=0.001"]))
    old = {k: v for k, v in new.items() if k != "train.step_decay"}
    assert config_changes(old, new) == []
    changed = flat_config(load_config(None, ["train.lr=0.001", "train.step_decay=0.5"]))
    assert config_changes(old, changed) == ["train.step_decay: 0.8 -> 0.5"]


def test_a_data_file_named_relative_or_absolute_is_the_same_source(tmp_path, monkeypatch):
    """`bundle --run` names the shipped data absolutely where a recipe run named it relatively: the same
    file is no change, another file is."""
    from draftforge.train.trainer import config_changes, flat_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    relative = flat_config(load_config(None, ["data.sources=[a.jsonl]"]))
    absolute = flat_config(load_config(None, [f"data.sources=[{tmp_path / 'a.jsonl'}]"]))
    other = flat_config(load_config(None, ["data.sources=[b.jsonl]"]))
    assert config_changes(relative, absolute) == []
    assert config_changes(relative, other) == ["data.sources: ['a.jsonl'] -> ['b.jsonl']"]


def test_resume_refuses_a_position_keyed_optimizer_state(tmp_path, tiny_target_dir, small_conversations, env):
    """Checkpoints from before the optimizer state was keyed by parameter name export but cannot resume:
    say so, instead of failing deep inside torch."""
    import torch

    out = tmp_path / "run"
    args = train_args(tiny_target_dir, small_conversations, out, "train.max_steps=1")
    subprocess.run(args, env=env, check=True, capture_output=True)
    optimizer_file = latest_checkpoint(out) / "optimizer.pt"
    saved = torch.load(optimizer_file, weights_only=True)
    optim = saved["optimizer"]["optimizer"]
    names = [p for g in optim["param_groups"] for p in g["params"]]
    optim["state"] = {names.index(k): v for k, v in optim["state"].items()}
    for g in optim["param_groups"]:
        g["params"] = [names.index(p) for p in g["params"]]
    torch.save(saved, optimizer_file)
    old = subprocess.run(args, env=env, capture_output=True, text=True)
    assert old.returncode != 0
    assert "optimizer state keyed by position" in old.stderr and "draft.init_from" in old.stderr


def test_draft_learns_on_a_tiny_target(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    from draftforge.train.setup import build_training

    config = load_config(None, [
        f"target.path={tiny_target_dir}", f"data.sources=[{small_conversations}]", "target.dtype=float32",
        "data.max_length=128", "data.eval_fraction=0", "draft.draft_vocab_size=49152", "train.precision=auto",
        "train.ttt_steps=2", "train.tokens_per_batch=1024", "train.max_steps=30", "train.warmup_steps=2",
        "train.save_every=1000", "train.eval_every=0", "train.lr=3e-3", "train.threads=1",
        f"train.out_dir={tmp_path / 'run'}",
    ])
    trainer = build_training(config)  # the full vocabulary: the random target's argmax is any token
    history = [trainer.train_step() for _ in range(30)]
    mean = lambda key, part: sum(m[key] for m in part) / len(part)
    first, last = history[:5], history[-5:]
    assert mean("loss", last) < 0.7 * mean("loss", first)
    assert mean("acc_0", last) > mean("acc_0", first) + 0.03


def test_closing_a_run_closes_its_tensorboard_writer(tmp_path):
    """`train` closes every run it builds; closing one flushes and closes the writer its metrics opened."""
    from types import SimpleNamespace

    from draftforge.train.trainer import Trainer

    left = []
    fake = SimpleNamespace(_tb=None, out=tmp_path, ttt=None, model=None,
                           dist=SimpleNamespace(main=True, close=lambda: left.append("process group")))
    Trainer._log(fake, {"step": 1, "loss": 0.5})
    writer = fake._tb
    Trainer.close(fake)
    assert writer.all_writers is None and fake._tb is None  # SummaryWriter.close ran
    assert left == ["process group"]
    assert next((tmp_path / "tensorboard").glob("events.out.tfevents.*")).stat().st_size > 0


def test_an_epoch_with_fewer_token_budget_batches_than_the_first_wraps():
    """Epoch 1's shuffle can pack into fewer batches than epoch 0's, which sets the epoch length: its
    missing positions wrap to its first batches instead of raising IndexError."""
    from types import SimpleNamespace

    from draftforge.train.trainer import Trainer

    epochs = {0: [[0], [1], [2]], 1: [[5, 6], [7]]}
    fake = SimpleNamespace(batches_per_epoch=3, _epoch_batches=epochs.__getitem__)
    assert [Trainer._positions(fake, n) for n in range(6)] == [[0], [1], [2], [5, 6], [7], [5, 6]]


def test_eval_max_samples_caps_the_evaluations_not_the_held_out_split(tmp_path, tiny_target_dir, small_conversations,
                                                                     isolated_cache):
    """Evaluating a large held-out split costs minutes of a budget; the cap reads fewer samples while the
    others stay out of training, and changing it does not block a resume."""
    from draftforge.train.setup import build_training
    from draftforge.train.trainer import config_changes, flat_config

    def build(*extra: str):
        return build_training(load_config(None, [
            f"target.path={tiny_target_dir}", f"data.sources=[{small_conversations}]", "target.dtype=float32",
            "data.max_length=128", "data.eval_fraction=0.5", "draft.draft_vocab_size=2000", "train.precision=fp32",
            "train.max_steps=1", "train.threads=1", f"train.out_dir={tmp_path / 'run'}", *extra]))

    full, capped = build(), build("train.eval_max_samples=2")
    assert len(full.eval_set) > 2 and len(capped.eval_set) == 2
    assert len(capped.train_set) == len(full.train_set)
    assert list(capped.eval_set.lengths) == list(full.eval_set.lengths[:2])
    assert config_changes(flat_config(full.config), flat_config(capped.config)) == []
    with pytest.raises(ConfigError, match="eval_max_samples must be at least 1"):
        build("train.eval_max_samples=0")
