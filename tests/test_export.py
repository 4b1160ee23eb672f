"""Export: every layout round-trips to the same logits, and --check catches what engines misread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftforge.cli import main
from draftforge.decode.draft_dir import load_draft_dir
from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import Eagle3Draft
from draftforge.export.formats import check_draft_dir, export_draft
from draftforge.train.checkpoint import save_checkpoint
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, target):
    """A random draft saved as the trainer saves it, with a non-trivial vocabulary mapping."""
    torch.manual_seed(1)
    cfg = DraftModelConfig.from_target_config(target.config, draft_vocab_size=200, aux_layers=[1, 4, 6])
    draft = Eagle3Draft(cfg)
    draft.load_target_embedding(target.get_input_embeddings().weight)
    ids = torch.sort(torch.randperm(512)[:200]).values
    t2d = torch.zeros(512, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_mapping(ids - torch.arange(200), t2d)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path_factory.mktemp("run")
    state = {k: v for k, v in draft.state_dict().items() if k != "embed_tokens.weight"}
    save_checkpoint(run, 7, state, {}, {"draft_config": cfg.to_dict(), "identity": {"target_name": "tiny-llama"}})
    return draft, run


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "speculators"])
def test_round_trip_same_logits(tmp_path, target, trained, fmt):
    draft, run = trained
    out = export_draft(run, fmt, tmp_path / fmt, dtype="float32")
    assert check_draft_dir(out, target.config.to_dict()) == []
    loaded = load_draft_dir(out, target)
    assert loaded.config.aux_layer_ids == [1, 4, 6]
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    ids = torch.randint(0, 512, (2, 9))
    hidden = draft.project(torch.randn(2, 9, 3 * 64))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        want = draft.logits(draft.step(ids, hidden, pos)[0])
        got = loaded.logits(loaded.step(ids, hidden, pos)[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    names = set(load_file(out / "model.safetensors"))
    assert "embed_tokens.weight" not in names
    assert any(n.startswith("layers.0." if fmt == "speculators" else "midlayer.") for n in names)
    config = json.loads((out / "config.json").read_text())
    if fmt != "speculators":
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 3, 5]  # SGLang: HF index - 1
        assert config["eagle_aux_hidden_state_layer_ids"] == [1, 4, 6]  # vLLM: HF index
        assert config["max_position_embeddings"] == target.config.max_position_embeddings
        assert "vllm serve" in (out / "README.md").read_text()


def _broken(tmp_path: Path, src: Path, name: str, edit_config=None, edit_weights=None) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_weights:
        weights = load_file(dst / "model.safetensors")
        edit_weights(weights)
        save_file(weights, dst / "model.safetensors")
    return dst


def _pop(key):
    return lambda d: d.pop(key)


FAULTS = {
    "missing weight": (None, _pop("midlayer.mlp.down_proj.weight"), "missing weight midlayer.mlp.down_proj"),
    "extra weight": (None, lambda w: w.__setitem__("midlayer.self_attn.q_proj.bias", torch.zeros(4)),
                     "unexpected weight midlayer.self_attn.q_proj.bias"),
    "wrong shape": (None, lambda w: w.__setitem__("fc.weight", torch.zeros(64, 128)), "fc.weight has shape"),
    "tied embeddings": (lambda c: c.__setitem__("tie_word_embeddings", True), None, "tie_word_embeddings"),
    "aux wrong convention": (lambda c: c.__setitem__("eagle_aux_hidden_state_layer_ids", [0, 3, 5]), None,
                             "wrong convention"),
    "aux missing for vLLM": (_pop("eagle_aux_hidden_state_layer_ids"), None, "vLLM"),
    "short context": (lambda c: c.__setitem__("max_position_embeddings", 512), None, "max_position_embeddings=512"),
    "no draft_vocab_size": (_pop("draft_vocab_size"), None, "draft_vocab_size is missing"),
    "d2t not increasing": (None, lambda w: w.__setitem__("d2t", torch.zeros_like(w["d2t"]) - 1), "d2t"),
    "t2d not bool": (None, lambda w: w.__setitem__("t2d", w["t2d"].to(torch.uint8)), "t2d has dtype"),
    "aux out of range": (lambda c: (c.__setitem__("eagle_aux_hidden_state_layer_ids", [1, 4, 9]),
                                    c["eagle_config"].__setitem__("eagle_aux_hidden_state_layer_ids", [0, 3, 8])),
                         None, "outside the target"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_check_catches_each_fault(tmp_path, target, trained, fault, capsys):
    _, run = trained
    good = export_draft(run, "sglang", tmp_path / "good", dtype="float32")
    edit_config, edit_weights, expect = FAULTS[fault]
    bad = _broken(tmp_path, good, "bad", edit_config, edit_weights)
    messages = [f.message for f in check_draft_dir(bad, target.config.to_dict()) if f.level == "error"]
    assert any(expect in m for m in messages), messages
    target_dir = tmp_path / "target"
    target.config.save_pretrained(target_dir)
    assert main(["export", "--check", str(bad), "--target", str(target_dir)]) == 1
    assert main(["export", "--check", str(good), "--target", str(target_dir)]) == 0
    assert "clean" in capsys.readouterr().out


def test_speculators_needs_norm_before_residual(tmp_path, trained):
    _, run = trained
    good = export_draft(run, "speculators", tmp_path / "spec", dtype="bfloat16")
    assert load_file(good / "model.safetensors")["fc.weight"].dtype == torch.bfloat16
    bad = _broken(tmp_path, good, "bad", _pop("norm_before_residual"))
    assert any("norm_before_residual" in f.message for f in check_draft_dir(bad))
