"""Tiny random-weight targets of every family we support, built offline from configs."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}

# family -> (config class, family-specific settings that make it distinct)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         decoder_sparse_step=1, head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=64)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                                    sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=64)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                     sliding_window=64)),
}


def tiny_config(family: str):
    class_name, extra = FAMILIES[family]
    return getattr(transformers, class_name)(**{**COMMON, **extra})


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    return model.eval()


# Families whose default taps are not all legal (hybrids) or that only recipes and the family
# pipeline test exercise; kept out of FAMILIES, whose tests tap the default layers.
SCOUT_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
              "original_max_position_embeddings": 512}  # Llama-4-Scout's bands (low == high), scaled down
KIMI_ROPE = {"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_group=1, topk_group=1, moe_intermediate_size=32, num_experts_per_tok=2)

MORE_FAMILIES: dict[str, tuple[str, dict]] = {
    # Qwen3-Next: gated DeltaNet (linear attention) x3 + gated full attention, MoE with a shared expert
    "qwen3_next": ("Qwen3NextConfig", dict(num_hidden_layers=12, head_dim=16, linear_num_key_heads=2,
                                           linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, full_attention_interval=4,
                                           partial_rotary_factor=0.25)),
    # DeepSeek-V3: multi-head latent attention, first layers dense, routed + shared experts, yarn
    "deepseek_v3": ("DeepseekV3Config", dict(MLA, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=3,
                                             rope_scaling={**KIMI_ROPE, "factor": 40.0, "beta_fast": 32.0},
                                             rope_theta=10000.0)),
    # Kimi-K2: the DeepSeek-V3 architecture with one dense layer, more experts, its own yarn
    "kimi_k2": ("DeepseekV3Config", dict(MLA, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                                         rope_scaling=KIMI_ROPE, rope_theta=50000.0)),
    # Llama-4 text: chunked attention with NoPE layers, MoE interleaved with dense MLPs of another width
    "llama4_text": ("Llama4TextConfig", dict(intermediate_size=32, intermediate_size_mlp=128, head_dim=16,
                                             num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                             attention_chunk_size=16, rope_scaling=SCOUT_ROPE, rope_theta=500000.0)),
}


def family_config(family: str, **overrides):
    """A tiny config of any family in FAMILIES or MORE_FAMILIES, with settings overridden (e.g. vocab_size)."""
    class_name, extra = {**FAMILIES, **MORE_FAMILIES}[family]
    return getattr(transformers, class_name)(**{**COMMON, **extra, **overrides})
