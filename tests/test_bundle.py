"""The bundle: the README table is the one `draftforge bundle` renders, measured rows come from
bundle/*.json, and the shared train -> export -> measure pipeline runs end to end on a tiny target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftforge import bundle, pipeline
from draftforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_what_bundle_renders():
    readme = (ROOT / "README.md").read_text()
    inside = readme.split(bundle.START, 1)[1].split(bundle.END, 1)[0].strip()
    assert inside == bundle.table(), "README's bundle table is stale: run `draftforge bundle --readme`"


def test_every_recipe_has_a_row_and_measured_rows_show_their_figures():
    lines = bundle.table().splitlines()
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert sum(f"recipes/{recipe.name})" in line for line in lines) == 1, recipe.name
    for name, row in bundle.measured_rows().items():
        line = next(line for line in lines if f"recipes/{name}.yaml)" in line)
        assert f"**{row['builtin']['chain']['tau']:.2f}**" in line
        tree = row["builtin"].get("tree")  # a DFlash row has none
        assert (f"{tree['speedup']:.2f}x" if tree else "/ —") in line
        assert row["command"].startswith(f"draftforge bundle --run {name}")


def test_run_refuses_a_target_this_machine_cannot_train(tmp_path):
    with pytest.raises(SystemExit, match="cannot be trained on this machine"):
        bundle.run_row("llama-3.3-70b-instruct", tmp_path, 1, 8, False, [])


def _tiny_run(tmp_path, target, conversations, *overrides):
    return load_config(None, [
        f"target.path={target}", f"data.sources=[{conversations}]", "target.dtype=float32",
        "data.max_length=128", "data.eval_fraction=0", "draft.draft_vocab_size=4000", "train.precision=fp32",
        "train.ttt_steps=2", "train.tokens_per_batch=1024", "train.max_steps=3", "train.warmup_steps=1",
        "train.save_every=1000", "train.eval_every=0", "train.threads=1", f"train.out_dir={tmp_path / 'run'}",
        *overrides,
    ])


def test_pipeline_trains_exports_and_measures(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    config = _tiny_run(tmp_path, tiny_target_dir, small_conversations)
    trained = pipeline.train(config, tmp_path, progress=False)
    assert trained["steps"] == 3 and trained["tokens_trained"] > 0 and Path(trained["tau_curve"]).exists()
    again = pipeline.train(config, tmp_path, progress=False)  # a finished run resumes and trains nothing
    assert again["tokens_trained"] == trained["tokens_trained"]

    exported = pipeline.export(trained["run_dir"], tmp_path)
    assert json.loads((Path(exported["sglang"]) / "config.json").read_text())["draft_vocab_size"] == 4000

    measured = pipeline.measure_builtin(exported["sglang"], str(tiny_target_dir), tmp_path, 1, 8)
    assert set(measured) == {"chain", "tree"}
    for m in measured.values():
        assert m["tau"] >= 1.0 and m["speedup"] > 0 and m["ngram_tau"] >= 1.0  # the free baseline, same prompts


def test_pipeline_exports_and_measures_a_dflash_draft_by_its_block(tmp_path, tiny_target_dir, small_conversations,
                                                                  isolated_cache):
    config = _tiny_run(tmp_path, tiny_target_dir, small_conversations, "draft.family=dflash", "draft.block_size=5",
                       "train.num_anchors=16")
    trained = pipeline.train(config, tmp_path, progress=False)
    exported = pipeline.export(trained["run_dir"], tmp_path)
    assert list(exported) == ["vllm"]  # one layout: vLLM's qwen3_dflash, which SGLang reads too
    assert pipeline.draft_configs(exported["vllm"]) == {"chain": "1,4,1,5"}  # the whole block: K = 5 - 1

    measured = pipeline.measure_builtin(exported["vllm"], str(tiny_target_dir), tmp_path, 1, 8)
    assert set(measured) == {"chain"} and measured["chain"]["tau"] >= 1.0 and measured["chain"]["ngram_tau"] >= 1.0
    report = json.loads((tmp_path / "eval.json").read_text())["results"]["mtbench"]
    assert list(report) == ["1,4,1,5"]
