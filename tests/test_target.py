"""Target capture through hooks equals transformers' own output_hidden_states, for every family."""

import pytest
import torch
import transformers

from draftforge.target.hf import HFTarget
from draftforge.target.taps import default_aux_layers
from tests.tiny_models import FAMILIES, MORE_FAMILIES, family_config, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hooks_match_output_hidden_states(family):
    model = tiny_model(family)
    target = HFTarget(model)
    ids = torch.randint(0, 512, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    feats = target.features(ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    n = model.config.num_hidden_layers
    assert target.aux_layers == default_aux_layers(n) == [2, n // 2, n - 3]
    expect_aux = torch.cat([hs[i] for i in target.aux_layers], dim=-1)
    assert feats.aux.shape == (2, 24, 3 * model.config.hidden_size)
    # valid rows bit for bit those of the masked forward (the batch runs unmasked), padding zero
    valid = mask.bool()
    assert torch.equal(feats.aux[valid], expect_aux[valid])
    assert not feats.aux[~valid].any() and not feats.final_hidden[~valid].any()
    # the teacher: final hidden (after the final norm) through the target head gives the logits
    torch.testing.assert_close(target.head.logits(feats.final_hidden)[valid], out.logits[valid], atol=1e-4,
                               rtol=1e-4)


def test_bf16_right_padded_batch_equals_masked_forward():
    """The unmasked run of a right-padded bf16 batch (rows past 192 tokens: SDPA's larger CPU tiles)."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    target = HFTarget(model)
    ids = torch.randint(0, 512, (3, 300))
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0
    mask[2, 7:] = 0
    feats = target.features(ids, mask)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = mask.bool()
    assert torch.equal(feats.aux[valid], torch.cat([hs[i] for i in target.aux_layers], dim=-1)[valid])


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_unmasked_right_padded_batch_for_hybrid_and_moe_families(family):
    """Linear attention (Qwen3-Next), MLA + MoE (DeepSeek-V3, Kimi-K2), chunked attention (Llama-4): valid
    rows of the unmasked run equal the masked forward's bit for bit."""
    torch.manual_seed(0)
    config = family_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    taps = [3, 7, 11] if family == "qwen3_next" else [1, 2, config.num_hidden_layers - 1]  # full-attention taps
    ids = torch.randint(0, 512, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 23:] = 0
    feats = HFTarget(model, aux_layers=taps).features(ids, mask)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = mask.bool()
    assert torch.equal(feats.aux[valid], torch.cat([hs[i] for i in taps], dim=-1)[valid])


def test_custom_taps_and_bad_taps():
    model = tiny_model("llama")
    target = HFTarget(model, aux_layers=[0, 3, 7])
    ids = torch.randint(0, 512, (1, 8))
    feats = target.features(ids, torch.ones_like(ids))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats.aux[..., :64], hs[0])
    with pytest.raises(ValueError, match="outside"):
        HFTarget(tiny_model("llama"), aux_layers=[1, 2, 8])
