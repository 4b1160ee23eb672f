"""The bundle: the README table is the one `draftforge bundle` renders, measured rows come from
bundle/*.json, and the shared train -> export -> measure pipeline runs end to end on a tiny target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftforge import bundle, pipeline
from draftforge.config import load_config
from draftforge.features.store import FeatureStore

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


def test_lookup_cell_gives_tokens_per_forward_where_measured():
    assert bundle._lookup({"ngram_tau": 2.837, "ngram_per_forward": 1.431}) == "2.84 (1.43)"
    assert bundle._lookup({"ngram_tau": 2.837}) == "2.84"  # rows measured before the count existed
    assert bundle._lookup({"tau": 1.4}) == "not measured"


def test_a_report_from_before_lookups_forward_count_still_reads():
    """A resumed demo or bundle reuses an eval report written before tokens_per_forward existed."""
    entry = {"accept_length": 1.4, "speedup": 0.9, "ngram": {"accept_length": 2.8}}
    assert pipeline._tau_speedup(entry) == {"tau": 1.4, "speedup": 0.9, "ngram_tau": 2.8}
    entry["ngram"]["tokens_per_forward"] = 1.43
    assert pipeline._tau_speedup(entry)["ngram_per_forward"] == 1.43


def test_run_refuses_a_target_this_machine_cannot_train(tmp_path):
    with pytest.raises(SystemExit, match="cannot be trained on this machine"):
        bundle.run_row("llama-3.3-70b-instruct", tmp_path, 1, 8, False, [])


def test_a_row_trains_on_its_recipes_sources_from_any_working_directory(tmp_path, monkeypatch):
    """Checkout files become absolute (the recipes write them relative to the checkout); packaged names stay."""
    monkeypatch.chdir(tmp_path)
    assert bundle.recipe_sources("smollm2-135m-hour-offline")[0] == "data/regenerated/smollm2-135m-sharegpt.jsonl"
    sources = ["sharegpt", "data/regenerated/smollm2-135m-sharegpt.jsonl", "data/regenerated/missing.jsonl"]
    assert bundle.checkout_paths(sources) == [
        "sharegpt", ROOT / "data/regenerated/smollm2-135m-sharegpt.jsonl", "data/regenerated/missing.jsonl"]


def test_run_row_trains_exports_and_writes_its_row(tmp_path, monkeypatch):
    """run_row = pipeline.train_export of the recipe on its data, then the measurements, into bundle/NAME.json."""
    calls = []
    trained = {"capture_minutes": 0.5, "tokens_trained": 600, "steps": 3, "final": {"tok_per_s": 10.0, "acc_0": 0.5}}

    def train_export(*args):
        calls.append(args)
        return trained, "d/draft-dflash"

    monkeypatch.setattr(pipeline, "train_export", train_export)
    monkeypatch.setattr(pipeline, "measure_builtin", lambda *a: {"chain": {"tau": 1.5, "speedup": 1.0}})
    monkeypatch.setattr(bundle, "results_dir", lambda: tmp_path / "bundle")
    row = bundle.run_row("smollm2-135m-dflash", tmp_path / "out", 2, 16, False, ["train.max_steps=3"])
    data = ["data/regenerated/smollm2-135m-sharegpt.jsonl"]  # the recipe's sources, made absolute to train
    assert calls == [(ROOT / "recipes" / "smollm2-135m-dflash.yaml", [ROOT / data[0]], tmp_path / "out",
                      ["train.max_steps=3"])]
    assert json.loads((tmp_path / "bundle" / "smollm2-135m-dflash.json").read_text()) == row
    assert {k: v for k, v in row.items() if k not in ("hardware", "measured_at")} == {
        "recipe": "recipes/smollm2-135m-dflash.yaml", "data": data, "overrides": ["train.max_steps=3"],
        "tokens_trained": 600, "steps": 3, "capture_minutes": 0.5, "train_minutes": 1.5, "final": trained["final"],
        "exported": "d/draft-dflash", "builtin": {"chain": {"tau": 1.5, "speedup": 1.0}}, "vllm": None,
        "eval": {"suite": "mtbench", "prompts": 2, "max_new_tokens": 16},
        "command": f"draftforge bundle --run smollm2-135m-dflash --out {tmp_path / 'out'} --eval-prompts 2 "
                   "--max-new-tokens 16 --no-vllm train.max_steps=3",
    }


def _tiny(target, *overrides):
    return [
        f"target.path={target}", "target.dtype=float32",
        "data.max_length=128", "data.eval_fraction=0", "draft.draft_vocab_size=4000", "train.precision=fp32",
        "train.ttt_steps=2", "train.tokens_per_batch=1024", "train.max_steps=3", "train.warmup_steps=1",
        "train.save_every=1000", "train.eval_every=0", "train.threads=1", *overrides,
    ]


def _tiny_run(tmp_path, target, conversations, *overrides):
    return load_config(None, [f"data.sources=[{conversations}]", f"train.out_dir={tmp_path / 'run'}",
                              *_tiny(target, *overrides)])


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
        assert m["tau"] >= 1.0 and m["speedup"] > 0 and m["ngram_tau"] >= m["ngram_per_forward"] >= 1.0  # free baseline


def test_an_offline_recipe_is_captured_before_it_trains_and_its_minutes_count(tmp_path, tiny_target_dir,
                                                                              small_conversations, isolated_cache):
    config = _tiny_run(tmp_path, tiny_target_dir, small_conversations, f"features.store={tmp_path / 'store'}")
    trained = pipeline.train(config, tmp_path, progress=False)
    assert trained["steps"] == 3 and trained["capture_minutes"] == FeatureStore(tmp_path / "store").capture_minutes > 0


def test_pipeline_exports_and_measures_a_dflash_draft_by_its_block(tmp_path, tiny_target_dir, small_conversations,
                                                                  isolated_cache):
    trained, draft = pipeline.train_export(None, [small_conversations], tmp_path, _tiny(
        tiny_target_dir, "draft.family=dflash", "draft.block_size=5", "train.num_anchors=16"))
    assert trained["steps"] == 3 and Path(trained["run_dir"]) == tmp_path / "train"
    assert pipeline.export(trained["run_dir"], tmp_path) == {"vllm": draft}  # one layout: vLLM's qwen3_dflash
    assert pipeline.draft_configs(draft) == {"chain": "1,4,1,5"} == {"chain": pipeline.block_chain(5)}  # K = 5 - 1

    measured = pipeline.measure_builtin(draft, str(tiny_target_dir), tmp_path, 1, 8)
    assert set(measured) == {"chain"} and measured["chain"]["tau"] >= 1.0 and measured["chain"]["ngram_tau"] >= 1.0
    report = json.loads((tmp_path / "eval.json").read_text())["results"]["mtbench"]
    assert list(report) == ["1,4,1,5"]
