"""Warm start (`draft.init_from`): fine-tuning continues from an exported draft directory, ours (SGLang or
speculators layout) or a third party's SGLang-layout one, e.g. to adapt a general draft to a domain.

The warm-started draft's first-step loss equals the loss of the draft it came from on the same batch; training
then continues and exports clean. A directory that does not fit the configured draft is refused, naming it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftforge.config import load_config
from draftforge.export.formats import check_draft_dir, export_draft
from draftforge.train.setup import build_training


def run_config(target, data, out, *extra):
    return load_config(None, [
        f"target.path={target}", f"data.sources=[{data}]", "target.dtype=float32", "data.max_length=96",
        "data.eval_fraction=0", "data.num_workers=1", "draft.draft_vocab_size=2000", "train.precision=fp32",
        "train.ttt_steps=2", "train.tokens_per_batch=384", "train.max_steps=8", "train.warmup_steps=1",
        "train.threads=1", "train.lr=3e-3", "train.eval_every=0", "train.save_every=1000", f"train.out_dir={out}",
        *extra,
    ])


@pytest.fixture
def source(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    """A draft trained for 3 steps (the one to warm-start from), and a function giving its loss on batch 0."""
    trainer = build_training(run_config(tiny_target_dir, small_conversations, tmp_path / "source"))
    for _ in range(3):
        trainer.train_step()
    ckpt = trainer.save()

    def loss_on_first_batch() -> float:
        trainer.micro = 0  # train_step reports the loss of the weights it starts from
        return trainer.train_step()["loss"]

    return trainer, ckpt, loss_on_first_batch


def warm(tmp_path, tiny_target_dir, small_conversations, init_from, *extra):
    return build_training(run_config(tiny_target_dir, small_conversations, tmp_path / "warm",
                                     f"draft.init_from={init_from}", *extra))


@pytest.mark.parametrize("fmt", ["sglang", "speculators"])
def test_warm_start_resumes_the_exported_draft(fmt, tmp_path, tiny_target_dir, small_conversations, source):
    trainer, ckpt, loss_on_first_batch = source
    exported = export_draft(ckpt, fmt, tmp_path / fmt, dtype="float32")
    before = {k: v.clone() for k, v in trainer.draft.state_dict().items()}
    expected = loss_on_first_batch()

    warmed = warm(tmp_path, tiny_target_dir, small_conversations, exported)
    for name, value in warmed.draft.state_dict().items():  # weights, d2t / t2d and the target's embedding
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    first = warmed.train_step()
    assert first["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-7)

    losses = [warmed.train_step()["loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    moved = warmed.draft.state_dict()
    assert not torch.equal(moved["fc.weight"], before["fc.weight"])
    again = export_draft(warmed.save(), "sglang", tmp_path / "again", dtype="float32")
    assert [f for f in check_draft_dir(again) if f.level == "error"] == []


def test_warm_start_from_a_third_party_sglang_dir(tmp_path, tiny_target_dir, small_conversations, source):
    """bf16 weights and an embedding copy, as SpecForge-style exports ship them: loaded, embedding ignored."""
    _, ckpt, loss_on_first_batch = source
    exported = export_draft(ckpt, "sglang", tmp_path / "ours", dtype="float32")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    tensors = load_file(exported / "model.safetensors")
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors["embed_tokens.weight"] = torch.zeros(49152, 64, dtype=torch.bfloat16)
    save_file(tensors, theirs / "model.safetensors")
    (theirs / "config.json").write_text((exported / "config.json").read_text())
    expected = loss_on_first_batch()

    warmed = warm(tmp_path, tiny_target_dir, small_conversations, theirs)
    assert warmed.draft.embed_tokens.weight.abs().sum() > 0  # the target's embedding, not the shipped zeros
    assert warmed.train_step()["loss"] == pytest.approx(expected, rel=2e-2)


def test_a_mismatched_directory_is_refused(tmp_path, tiny_target_dir, small_conversations, source):
    _, ckpt, _ = source
    exported = export_draft(ckpt, "sglang", tmp_path / "ours", dtype="float32")
    with pytest.raises(SystemExit, match=r"cannot warm-start.*lm_head\.weight") as refused:
        warm(tmp_path, tiny_target_dir, small_conversations, exported, "draft.draft_vocab_size=1000")
    assert str(exported) in str(refused.value)
    with pytest.raises(SystemExit, match=r"cannot warm-start.*mlp\.gate_proj\.weight"):
        warm(tmp_path, tiny_target_dir, small_conversations, exported, "draft.overrides={intermediate_size: 96}")
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = load_file(exported / "model.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, partial / "model.safetensors")
    with pytest.raises(SystemExit, match=r"missing \['norm\.weight'\]"):
        warm(tmp_path, tiny_target_dir, small_conversations, partial)


def test_a_draft_trained_on_other_taps_is_refused(tmp_path, tiny_target_dir, small_conversations, source):
    _, ckpt, _ = source  # trained on the default taps [2, 3, 3] of the 6-layer target
    exported = export_draft(ckpt, "sglang", tmp_path / "ours", dtype="float32")
    with pytest.raises(SystemExit, match="aux"):
        warm(tmp_path, tiny_target_dir, small_conversations, exported, "target.aux_layers=[1, 2, 4]")
