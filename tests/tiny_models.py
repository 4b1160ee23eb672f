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
