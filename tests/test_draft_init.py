"""A draft that starts from what the target knows: its output layer as the draft's head
(`draft.head_from_target`) and aux taps scaled to unit RMS (`draft.normalize_taps`), folded into
fc on export so an engine reads the same function."""

from __future__ import annotations

import pytest
import torch

from draftforge.decode.draft_dir import load_draft_dir
from draftforge.draft.model import Eagle3Draft, fold_tap_scales
from draftforge.export.formats import check_draft_dir, export_draft
from draftforge.target.hf import HFTarget
from draftforge.train.setup import build_training
from tests.test_draft_model import tiny_config
from tests.test_warm_start import run_config


def test_head_from_target_is_the_targets_logit_lens(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    trainer = build_training(run_config(tiny_target_dir, small_conversations, tmp_path / "run",
                                        "draft.head_from_target=true"))
    draft = trainer.draft
    target = HFTarget.from_pretrained(str(tiny_target_dir), dtype=torch.float32)
    model = target.model
    hidden = torch.randn(2, 5, draft.config.hidden_size) * 3  # any hidden state of the target's width
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(hidden))[..., draft.t2d]
        got = draft.logits(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(draft.lm_head.weight, Eagle3Draft(draft.config).lm_head.weight)


def test_head_from_target_refuses_another_width():
    draft = Eagle3Draft(tiny_config())
    with pytest.raises(ValueError, match="does not fit"):
        draft.head_from_target(torch.randn(100, 16), torch.ones(16))


def test_tap_scales_fold_exactly_into_fc():
    draft = Eagle3Draft(tiny_config())
    aux = torch.randn(2, 7, 96) * torch.tensor([3.0, 7.0, 20.0]).repeat_interleave(32)
    plain = draft.project(aux)
    draft.set_tap_scales([0.25, 0.125, 0.0625])
    scaled = draft.project(aux)
    assert not torch.allclose(scaled, plain)
    folded = torch.nn.functional.linear(aux, fold_tap_scales(draft.fc.weight, draft.config))
    assert torch.equal(folded, scaled)  # powers of two: exact, not merely close


def test_measured_scales_resume_and_export(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    out = tmp_path / "run"
    trainer = build_training(run_config(tiny_target_dir, small_conversations, out, "draft.normalize_taps=true"))
    scales = trainer.draft.config.tap_scales
    assert scales is not None and all(s == 2.0 ** round(torch.tensor(s).log2().item()) for s in scales)
    batch_aux = trainer.features(trainer_batch(trainer)).aux  # taps at unit RMS, within the rounding to 2^k
    rms = batch_aux.float().view(*batch_aux.shape[:2], 3, -1).pow(2).mean((0, 1, 3)).sqrt()
    assert all(0.7 <= float(r) * s <= 1.42 for r, s in zip(rms, scales, strict=True))
    for _ in range(2):
        trainer.train_step()
    ckpt = trainer.save()

    resumed = build_training(run_config(tiny_target_dir, small_conversations, out, "draft.normalize_taps=true"))
    resumed.draft.set_tap_scales([1.0, 1.0, 1.0])  # whatever was measured anew, the run's own scales come back
    assert resumed.resume() and resumed.draft.config.tap_scales == scales

    exported = export_draft(ckpt, "sglang", tmp_path / "export", dtype="float32")
    assert not [f for f in check_draft_dir(exported) if f.level == "error"]
    engine = load_draft_dir(exported)
    assert engine.config.tap_scales is None  # an engine sees a plain fc
    aux = torch.randn(1, 4, batch_aux.shape[-1]) * 5
    with torch.no_grad():
        torch.testing.assert_close(engine.project(aux), trainer.draft.project(aux), rtol=1e-6, atol=1e-6)


def trainer_batch(trainer):
    from draftforge.data.batch import collate

    return collate(trainer.train_set, trainer.upcoming(1)[0])
