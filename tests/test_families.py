"""Every family end to end on a tiny random model of its architecture (SmolLM2's tokenizer and vocabulary):
`draftforge recipe` on its config.json -> prepare -> target features -> a few TTT steps with the recipe's
taps and draft overrides -> export -> `export --check` against the target, clean."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from draftforge.cli import main
from draftforge.config import load_recipe
from draftforge.export.formats import export_draft
from draftforge.recipe import SHAPE_KEYS, validate_recipe
from draftforge.target.facts import linear_layers
from draftforge.train.setup import build_training
from tests.tiny_models import FAMILIES, MORE_FAMILIES, family_config

ALL_FAMILIES = sorted({**FAMILIES, **MORE_FAMILIES})


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_recipe_train_export(family, tmp_path, smollm2_tokenizer, small_conversations, isolated_cache):
    target = tmp_path / "target"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size=len(smollm2_tokenizer)))
    model.save_pretrained(target)
    smollm2_tokenizer.save_pretrained(target)

    recipe_file = tmp_path / "recipe.yaml"
    assert main(["recipe", str(target / "config.json"), "--out", str(recipe_file)]) == 0
    run, meta = load_recipe(recipe_file)
    assert validate_recipe(run, meta) == []
    assert run.target.path == str(target)
    assert not set(run.target.aux_layers) & set(linear_layers(meta["target_config"]))

    # the recipe as written, shrunk to a few tiny steps on one thread
    d = run.data
    d.sources, d.max_rows, d.max_length, d.num_workers, d.eval_fraction = [str(small_conversations)], None, 96, 1, 0.0
    run.target.dtype, run.draft.draft_vocab_size, run.features.store = "float32", 2000, None
    t = run.train
    t.precision, t.ttt_steps, t.tokens_per_batch, t.grad_accum = "fp32", 2, 384, 1
    t.epochs, t.max_steps, t.warmup_steps, t.threads, t.out_dir = None, 3, 1, 1, str(tmp_path / "run")
    trainer = build_training(run)
    cfg = trainer.draft.config
    assert cfg.aux_layer_ids == meta["taps"]["hf_hidden_states"]
    assert {k: getattr(cfg, k) for k in SHAPE_KEYS if k != "draft_vocab_size"} == {
        k: v for k, v in meta["draft"]["shape"].items() if k != "draft_vocab_size"}
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in losses), losses

    draft = export_draft(trainer.save(), "sglang", tmp_path / "draft", dtype="float32")
    assert main(["export", "--check", str(draft), "--target", str(target)]) == 0
