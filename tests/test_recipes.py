"""Recipes: every file in recipes/ is a loadable run config, and every target recipe's `recipe:` section is
consistent (schema; the recorded config facts give the recorded draft shape, taps, parameter count within 10%
of the model card, hardware and serving commands; taps legal for the architecture). `draftforge recipe` on
each tiny family's config.json, hybrids included, writes a recipe that passes the same checks; each family
quirk is applied; a tampered recipe is caught."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from draftforge.cli import main
from draftforge.config import ConfigError, load_config, load_recipe
from draftforge.recipe import build_recipe, choose_taps, dump_recipe, validate_recipe
from draftforge.target.facts import linear_layers, target_facts
from draftforge.train.memory_model import GIB, fits, recipe_memory, recipe_shape
from tests.tiny_models import FAMILIES, MORE_FAMILIES, family_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
RECIPES_BY_STEM = {p.stem: p for p in RECIPES}
TARGET_RECIPES = [p for p in RECIPES if load_recipe(p)[1]]
ALL_FAMILIES = sorted({**FAMILIES, **MORE_FAMILIES})


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_file_is_valid(path):
    run, meta = load_recipe(path)
    if not meta:  # a plain run config (the demo's): nothing more to check than that it loads
        load_config(path)
        return
    assert validate_recipe(run, meta) == []
    assert "published_params_b" in meta and meta["sources"], "curated recipes say where their facts come from"


@pytest.mark.parametrize("path", TARGET_RECIPES, ids=[p.stem for p in TARGET_RECIPES])
def test_training_hardware_holds_the_memory_models_peak(path):
    """The GPU a recipe's hardware line trains on holds memory_model's peak at the recipe's own settings (its
    micro-batch, checkpointing, online target or store) with the model's uncounted share left free, and the
    line records that peak: the README's memory table and the hardware lines are one estimate."""
    hw = load_recipe(path)[1]["hardware"]
    count, gpu = hw["train_gpus"].split("x ", 1)
    peak = recipe_memory(*recipe_shape(path))["peak_bytes"]
    assert count == "1" and fits(peak, gpu), f"{hw['train_gpus']}: memory_model predicts {peak / GIB:.1f} GiB"
    assert hw["train_peak_gib"] == round(peak / GIB, 1)


def test_the_bundle_covers_the_issue_targets():
    targets = {load_recipe(p)[1].get("target") for p in RECIPES}
    for name in ("Llama-3.1-8B", "Llama-3.3-70B", "Llama-4-Scout", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen3-Next-80B",
                 "Qwen3-Coder-30B", "Qwen3-Coder-480B", "gpt-oss-20b", "gpt-oss-120b", "Kimi-K2", "Ling-flash-2.0",
                 "Nex", "phi-4", "gemma-3", "DeepSeek-V3", "Mistral"):
        assert any(t and name in t for t in targets), name


def test_train_config_loader_reads_recipe_files():
    load_config(RECIPES_BY_STEM["llama-3.1-8b-instruct"])


def write_family_config(tmp_path: Path, family: str, **over) -> Path:
    family_config(family, **over).save_pretrained(tmp_path)
    return tmp_path / "config.json"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_recipe_command_on_every_family(family, tmp_path):
    config = write_family_config(tmp_path, family)
    out = tmp_path / "recipe.yaml"
    assert main(["recipe", str(config), "--out", str(out)]) == 0
    run, meta = load_recipe(out)
    assert validate_recipe(run, meta) == []
    assert main(["recipe", "--check", str(out)]) == 0
    assert not set(run.target.aux_layers) & set(linear_layers(meta["target_config"]))
    assert run.draft.draft_vocab_size == 512  # the suggestion is capped at the tiny vocabulary


def facts_of(family: str, **over) -> dict:
    return target_facts(family_config(family, **over).to_dict())


def test_hybrid_taps_move_to_full_attention_layers():
    facts = facts_of("qwen3_next")  # 12 layers, full attention at 3, 7, 11
    assert linear_layers(facts) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    taps, why = choose_taps(facts)
    assert taps == [3, 7, 11] and "moved" in why
    facts["layer_types"] = ["linear_attention"] * 10 + ["full_attention"] * 2
    with pytest.raises(ConfigError, match="only 2 full-attention layers"):
        choose_taps(facts)


def test_family_quirks(tmp_path):
    gpt_oss = build_recipe(family_config("gpt_oss").to_dict(), "x/gpt-oss")  # experts only: 3.5 x 64 -> 256
    assert gpt_oss["draft"]["overrides"] == {"intermediate_size": 256}
    assert "expert's width" in gpt_oss["recipe"]["draft"]["overrides_why"]["intermediate_size"]
    assert gpt_oss["recipe"]["draft"]["shape"]["rope_scaling"]["rope_type"] == "yarn"
    llama4 = build_recipe(family_config("llama4_text").to_dict(), "x/llama4")  # the dense MLP width, not the expert's
    assert llama4["draft"]["overrides"] == {"intermediate_size": 128}
    assert build_recipe(family_config("qwen3_moe").to_dict(), "x/q")["draft"]["overrides"] == {}  # 128 is dense
    mla = build_recipe(family_config("kimi_k2").to_dict(), "x/kimi")
    assert mla["draft"]["overrides"] == {"head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 4}
    llama = build_recipe(family_config("llama").to_dict(), "x/llama")["recipe"]
    assert llama["draft"]["shape"]["rope_scaling"]["rope_type"] == "llama3"
    assert llama["draft"]["shape"]["max_position_embeddings"] == 4096  # the target's context, not a training length
    tied = build_recipe(family_config("qwen2").to_dict(), "x/qwen2")["recipe"]["quirks"]
    assert any("tied embeddings" in q for q in tied)
    assert any("softcapping" in q for q in build_recipe(family_config("gemma2").to_dict(), "x/g")["recipe"]["quirks"])
    big_vocab = build_recipe(family_config("llama", vocab_size=49152).to_dict(), "x/llama")
    assert big_vocab["draft"]["draft_vocab_size"] == 32000


def test_a_draft_no_single_gpu_holds_is_refused():
    """A Llama-3.1-405B-sized draft (hidden 16384): offline and checkpointed it still needs 131 GiB at the
    default micro-batch, more than a 141 GB GPU leaves; the recipe says so rather than naming a GPU."""
    raw = family_config("llama", hidden_size=16384, intermediate_size=53248, num_attention_heads=128,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256).to_dict()
    with pytest.raises(ConfigError, match="fits no single GPU.*offline checkpointed 131.4 > 125.1 GiB usable on 141"):
        build_recipe(raw, "x/llama-405b-like")


def test_custom_code_families_ask_for_trust_remote_code():
    raw = {**family_config("qwen3_moe").to_dict(), "model_type": "bailing_moe", "num_shared_experts": 1,
           "first_k_dense_replace": 1}
    tree = build_recipe(raw, "inclusionAI/Ling-like")
    assert tree["target"]["trust_remote_code"] is True
    assert "--trust-remote-code" in tree["recipe"]["serve"]["sglang"]
    assert "--trust-remote-code" in tree["recipe"]["serve"]["vllm"]


def tampered(tmp_path: Path, edit) -> list[str]:
    good = RECIPES_BY_STEM["qwen3-next-80b-a3b-instruct"]
    tree = yaml.safe_load(good.read_text())
    edit(tree)
    path = tmp_path / "bad.yaml"
    path.write_text(dump_recipe(copy.deepcopy(tree)))
    return validate_recipe(*load_recipe(path))


TAMPERS = [
    (lambda t: t["target"].update(aux_layers=[2, 23, 43]), "target.aux_layers"),
    (lambda t: (t["target"].update(aux_layers=[2, 23, 43]), t["recipe"]["taps"].update(hf_hidden_states=[2, 23, 43])),
     "linear-attention"),
    (lambda t: t["recipe"]["draft"]["shape"].update(hidden_size=4096), "draft.shape.hidden_size"),
    (lambda t: t["recipe"]["target_config"].update(num_experts=64), "model card"),
    (lambda t: t["draft"].update(overrides={"intermediate_size": 1024}), "draft.overrides"),
    (lambda t: t["recipe"]["serve"].update(vllm="vllm serve Qwen/Qwen3-Next-80B-A3B-Instruct"), "serve.vllm"),
    (lambda t: t["recipe"].pop("hardware"), "recipe.hardware"),
    (lambda t: t["target"].update(trust_remote_code=True), "trust_remote_code"),
    (lambda t: t.pop("features"), "features.store"),
    (lambda t: t["train"].update(gradient_checkpointing=True), "train.gradient_checkpointing"),
    (lambda t: t["recipe"]["hardware"].update(train_gpus="1x 141 GB (H200)"), "hardware.train_gpus"),
    (lambda t: t["recipe"]["hardware"].update(target_weights_gb=16.0), "hardware.target_weights_gb"),
]


@pytest.mark.parametrize("edit, message", TAMPERS, ids=[m for _, m in TAMPERS])
def test_validation_catches_a_tampered_recipe(tmp_path, edit, message):
    problems = tampered(tmp_path, edit)
    assert any(message in p for p in problems), problems


def test_check_command_fails_on_a_bad_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    tree = yaml.safe_load(RECIPES_BY_STEM["llama-3.1-8b-instruct"].read_text())
    tree["recipe"]["taps"]["sglang_layer_ids"] = tree["recipe"]["taps"]["hf_hidden_states"]  # the wrong convention
    bad.write_text(dump_recipe(tree))
    assert main(["recipe", "--check", str(bad)]) == 1
    assert "hf_hidden_states - 1" in capsys.readouterr().out


def test_check_command_passes_every_shipped_file(capsys):
    """recipes/ holds target recipes and plain run configs (the SmolLM2 ones); --check accepts both kinds."""
    assert main(["recipe", "--check", *map(str, RECIPES)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m.yaml: ok (run config)" in out and "phi-4.yaml: ok (recipe)" in out


def test_check_command_fails_on_a_run_config_that_does_not_load(tmp_path, capsys):
    tree = yaml.safe_load(RECIPES_BY_STEM["smollm2-135m"].read_text())
    tree["draft"]["draft_vocab"] = tree["draft"].pop("draft_vocab_size")  # a typo: must not train with defaults
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(tree))
    assert main(["recipe", "--check", str(RECIPES_BY_STEM["smollm2-135m"]), str(bad)]) == 1
    assert "unknown key draft.draft_vocab" in capsys.readouterr().out


def test_recipe_command_reads_a_model_dir_and_prints(tmp_path, capsys):
    write_family_config(tmp_path, "gemma3")
    assert main(["recipe", str(tmp_path)]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["target"]["path"] == str(tmp_path)
    assert json.loads(json.dumps(tree["recipe"]["target_config"]))["model_type"] == "gemma3_text"
