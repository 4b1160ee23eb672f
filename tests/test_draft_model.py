"""Draft config derivation, exact parameter names, RoPE, and the inference step."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import Eagle3Draft, Rotary, apply_rope


def tiny_config(**over) -> DraftModelConfig:
    base = dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
        vocab_size=100, draft_vocab_size=20, target_hidden_size=32, aux_layer_ids=[2, 4, 6],
    )
    base.update(over)
    return DraftModelConfig(**base)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_from_llama_config_with_llama3_rope():
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                     num_hidden_layers=32, vocab_size=500, max_position_embeddings=1024,
                     rope_theta=500000.0, rope_scaling=dict(LLAMA3), rms_norm_eps=1e-5)
    c = DraftModelConfig.from_target_config(hf, draft_vocab_size=100)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
    assert c.aux_layer_ids == [2, 16, 29]
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"
    assert c.rope_scaling["factor"] == 8.0 and "rope_theta" not in c.rope_scaling
    assert (c.max_position_embeddings, c.vocab_size, c.draft_vocab_size) == (1024, 500, 100)
    assert c.target_hidden_size == 64 and c.rms_norm_eps == 1e-5
    again = DraftModelConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_old_style_config_without_head_dim():
    hf = SimpleNamespace(hidden_size=48, num_attention_heads=6, num_key_value_heads=None, intermediate_size=64,
                         num_hidden_layers=12, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-6,
                         rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    c = DraftModelConfig.from_target_config(hf, 50, aux_layers=[1, 5, 9], overrides={"intermediate_size": 128})
    assert c.head_dim == 8 and c.num_key_value_heads == 6
    assert c.rope_theta == 20000.0 and c.rope_scaling == {"factor": 2.0, "rope_type": "linear"}
    assert c.aux_layer_ids == [1, 5, 9] and c.intermediate_size == 128
    with pytest.raises(KeyError):
        DraftModelConfig.from_target_config(hf, 50, overrides={"hiden_size": 1})


def test_qwen2_and_gemma3_rope():
    q = DraftModelConfig.from_target_config(
        Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                    num_hidden_layers=8, vocab_size=200, rope_theta=1e6), 20)
    assert q.rope_theta == 1e6 and q.rope_scaling is None
    g = DraftModelConfig.from_target_config(
        Gemma3TextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                         intermediate_size=64, num_hidden_layers=8, vocab_size=200), 20)
    assert g.rope_theta == 1e6 and g.head_dim == 16  # the global (full attention) layers' RoPE


def test_parameter_and_buffer_names():
    m = Eagle3Draft(tiny_config())
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {
        "embed_tokens.weight": (100, 32),
        "fc.weight": (32, 96),
        "midlayer.self_attn.q_proj.weight": (32, 64),
        "midlayer.self_attn.k_proj.weight": (16, 64),
        "midlayer.self_attn.v_proj.weight": (16, 64),
        "midlayer.self_attn.o_proj.weight": (32, 32),
        "midlayer.mlp.gate_proj.weight": (48, 32),
        "midlayer.mlp.up_proj.weight": (48, 32),
        "midlayer.mlp.down_proj.weight": (32, 48),
        "midlayer.input_layernorm.weight": (32,),
        "midlayer.hidden_norm.weight": (32,),
        "midlayer.post_attention_layernorm.weight": (32,),
        "norm.weight": (32,),
        "lm_head.weight": (20, 32),
    }
    assert {n: (b.dtype, tuple(b.shape)) for n, b in m.named_buffers()} == {
        "d2t": (torch.long, (20,)), "t2d": (torch.bool, (100,))
    }
    assert set(m.state_dict()) == set(names) | {"d2t", "t2d"}
    assert not m.embed_tokens.weight.requires_grad


def test_embedding_and_vocab_mapping():
    m = Eagle3Draft(tiny_config())
    w = torch.randn(100, 32)
    m.load_target_embedding(w)
    assert torch.equal(m.embed_tokens.weight, w) and not m.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError):
        m.load_target_embedding(torch.randn(100, 16))
    ids = torch.sort(torch.randperm(100)[:20]).values
    t2d = torch.zeros(100, dtype=torch.bool)
    t2d[ids] = True
    m.set_vocab_mapping(ids - torch.arange(20), t2d)
    assert torch.equal(m.to_target_ids(torch.arange(20)), ids)
    with pytest.raises(ValueError):
        m.set_vocab_mapping(torch.zeros(20, dtype=torch.long), t2d)


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_matches_transformers(scaling):
    c = tiny_config(rope_theta=50000.0, rope_scaling=scaling)
    hf = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=256, rope_theta=50000.0, rope_scaling=scaling)
    pos = torch.arange(200)[None]
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = Rotary(c)(pos)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)


def _manual_layer(m: Eagle3Draft, ids, hidden, pos):
    """docs/design.md §4.2 spelled out with separate projections and dense causal softmax."""
    L_ = m.midlayer
    a = L_.self_attn
    x = torch.cat([L_.input_layernorm(m.embed_tokens(ids)), L_.hidden_norm(hidden)], -1)
    B, T = ids.shape
    q = a.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
    k = a.k_proj(x).view(B, T, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = a.v_proj(x).view(B, T, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    cos, sin = m.rotary(pos)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    s = (q @ k.transpose(-1, -2)) / 8**0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32)
    h = hidden + a.o_proj(o)
    return h + L_.mlp(L_.post_attention_layernorm(h))


def test_step_matches_manual_and_cache():
    torch.manual_seed(0)
    m = Eagle3Draft(tiny_config()).double()
    B, T = 2, 9
    ids = torch.randint(0, 100, (B, T))
    hidden = m.project(torch.randn(B, T, 96, dtype=torch.float64))
    pos = torch.arange(T).expand(B, T) + 3
    full, (k, v) = m.step(ids, hidden, pos)
    assert torch.allclose(full, _manual_layer(m, ids, hidden, pos), atol=1e-10)
    assert k.shape == (B, 2, T, 8)
    # prefix then the rest with the cache, then one token at a time
    a, kv = m.step(ids[:, :5], hidden[:, :5], pos[:, :5])
    b, kv = m.step(ids[:, 5:8], hidden[:, 5:8], pos[:, 5:8], past_kv=kv)
    c, kv = m.step(ids[:, 8:], hidden[:, 8:], pos[:, 8:], past_kv=kv)
    assert torch.allclose(torch.cat([a, b, c], 1), full, atol=1e-10)
    assert torch.allclose(kv[0], k, atol=1e-12)
    # an explicit bool mask [B, 1, T, S+T] equal to the causal one gives the same result
    mask = torch.ones(3, 8, dtype=torch.bool).tril(5).expand(B, 1, 3, 8)
    _, kv5 = m.step(ids[:, :5], hidden[:, :5], pos[:, :5])
    b2, _ = m.step(ids[:, 5:8], hidden[:, 5:8], pos[:, 5:8], past_kv=kv5, attn_mask=mask)
    assert torch.allclose(b2, b, atol=1e-12)
    logits = m.logits(full)
    assert logits.shape == (B, T, 20)


def test_fused_norm_and_swiglu_gradients():
    from draftforge.draft.model import MLP, RMSNorm, _SiluMul

    norm = RMSNorm(8, 1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: norm(x), (x, norm.weight))
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), ref, atol=1e-12)
    g, u = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_SiluMul.apply, (g, u))
    mlp = MLP(tiny_config()).double()
    y = torch.randn(3, 32, dtype=torch.float64)
    expect = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(y)) * mlp.up_proj(y))
    assert torch.allclose(mlp(y), expect, atol=1e-12)
    # bf16 activations with float32 weights (autocast): output keeps the activation dtype
    assert norm.float()(torch.randn(4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_qkv_halves_kept_without_autograd_follow_the_weights():
    """Decoding keeps q/k/v's halves between steps; a weight changed in place (an optimizer step) is seen."""
    torch.manual_seed(0)
    draft = Eagle3Draft(tiny_config())
    h = draft.config.hidden_size
    ids, hidden, pos = torch.tensor([[3, 1, 4]]), torch.randn(1, 3, h), torch.arange(3)[None]
    with torch.no_grad():
        first = draft.step(ids, hidden, pos)[0]
        assert draft.midlayer._qkv_weight()[0] is draft.midlayer._qkv_weight()[0]  # kept, not rebuilt
        draft.midlayer.self_attn.k_proj.weight.mul_(3.0)
        changed = draft.step(ids, hidden, pos)[0]
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, draft.step(ids, hidden, pos)[0])  # the autograd path, rebuilt each call
