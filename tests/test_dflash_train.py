"""`draft.family: dflash` through the shared trainer: it learns, exports a clean vLLM layout that the
built-in decoder reads back losslessly, and a run SIGKILLed mid-way resumes bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from draftforge.config import ConfigError, load_config
from tests.conftest import kill_after_checkpoint
from tests.test_trainer import losses

DFLASH = ["draft.family=dflash", "draft.block_size=4", "train.num_anchors=64"]


def train_args(target: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "draftforge.cli", "train", "--no-progress", *DFLASH,
        f"target.path={target}", f"data.sources=[{data}]", "target.dtype=float32", "data.max_length=128",
        "data.eval_fraction=0", "draft.draft_vocab_size=2000", "train.precision=fp32",
        "train.tokens_per_batch=512", "train.max_steps=8", "train.warmup_steps=2", "train.save_every=1",
        "train.keep_last=3", "train.log_every=1", "train.eval_every=0", "train.threads=1", "train.lr=3e-3",
        f"train.out_dir={out}", *extra,
    ]


def test_learns_exports_and_decodes(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    from transformers import AutoModelForCausalLM

    from draftforge.decode.dflash import BlockDecoder
    from draftforge.decode.draft_dir import load_dflash_dir
    from draftforge.decode.plain import plain_generate
    from draftforge.decode.spec import SpecConfig
    from draftforge.export.formats import check_draft_dir, export_draft
    from draftforge.train.dflash_objective import DFlashObjective
    from draftforge.train.setup import build_training

    config = load_config(None, [
        *DFLASH, f"target.path={tiny_target_dir}", f"data.sources=[{small_conversations}]", "target.dtype=float32",
        "data.max_length=128", "data.eval_fraction=0.1", "draft.draft_vocab_size=49152", "train.precision=auto",
        "train.tokens_per_batch=1024", "train.max_steps=30", "train.warmup_steps=2", "train.save_every=1000",
        "train.eval_every=0", "train.lr=3e-3", "train.threads=1", f"train.out_dir={tmp_path / 'run'}",
    ])
    trainer = build_training(config)
    assert isinstance(trainer.ttt, DFlashObjective) and trainer.draft.config.full_vocab
    assert trainer.draft.config.mask_token_id == 16 and trainer.draft.config.aux_layer_ids == [2, 3, 4]
    history = [trainer.train_step() for _ in range(30)]
    mean = lambda key, part: sum(m[key] for m in part) / len(part)  # noqa: E731
    first, last = history[:5], history[-5:]
    assert mean("loss", last) < 0.7 * mean("loss", first)
    assert mean("acc_0", last) > mean("acc_0", first) + 0.03
    assert set(history[-1]) >= {"acc_2", "cacc_2", "cond_tau", "sim_tau"} and "acc_3" not in history[-1]
    ev = trainer.evaluate()
    assert ev["eval_supervised"] > 0 and trainer.evaluate() == ev  # evaluation draws the same anchors

    trainer.save()
    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    out = export_draft(trainer.out, "vllm", tmp_path / "export", dtype="float32")
    assert check_draft_dir(out, json.loads((tiny_target_dir / "config.json").read_text())) == []
    dec = BlockDecoder(target, load_dflash_dir(out, target))
    prompts = [[1, 9038, 2, 198, 1, 4093, 198, 21642, 282, 1], [1, 4093, 198, 57, 2]]
    spec = SpecConfig(2, 3, 1, 4)
    assert dec.generate(prompts, spec, 16).tokens == plain_generate(target, prompts, 16)


def test_unknown_family_and_eagle_only_options(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    from draftforge.train.setup import build_training

    base = [f"target.path={tiny_target_dir}", f"data.sources=[{small_conversations}]", f"train.out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="draft.family"):
        build_training(load_config(None, [*base, "draft.family=medusa"]))
    with pytest.raises(ConfigError, match="EAGLE-3 options"):
        build_training(load_config(None, [*base, *DFLASH, "draft.normalize_taps=true"]))


def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    env = {**os.environ, "DRAFTFORGE_CACHE": str(isolated_cache), "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    done = subprocess.run(train_args(tiny_target_dir, small_conversations, straight), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 9))

    killed = tmp_path / "killed"
    stopped_at = kill_after_checkpoint(train_args(tiny_target_dir, small_conversations, killed), env, killed, step=3)
    assert stopped_at < 8, "the run finished before it could be killed"
    subprocess.run(train_args(tiny_target_dir, small_conversations, killed), env=env, check=True,
                   capture_output=True)
    assert losses(killed) == expected  # the same anchors were drawn after the resume
