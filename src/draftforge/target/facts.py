"""What a target model's HF config.json says, read once for every user: its text model's facts (sizes,
layers, attention and MoE layout, vocabulary, quantisation), the config object transformers builds from
them, and the parameter and weight bytes they imply. Facts only: what a recipe decides from them is
draftforge.recipe's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from draftforge.config import ConfigError

# config.json keys recorded as the target's facts (text model; HF names, values as the file has them)
FACT_KEYS = (
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "intermediate_size_mlp", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "n_shared_experts", "num_shared_experts", "first_k_dense_replace", "moe_layer_freq",
    "decoder_sparse_step", "mlp_only_layers", "interleave_moe_layer_step", "vocab_size",
    "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "rms_norm_eps", "tie_word_embeddings", "sliding_window", "layer_types", "full_attention_interval",
    "attention_chunk_size", "no_rope_layers", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "final_logit_softcapping", "quant_method",
)
# filled from transformers' own config class when config.json leaves them implicit
DERIVED_KEYS = ("layer_types", "tie_word_embeddings")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a config.json ({e})") from None


def known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def target_facts(raw: dict[str, Any]) -> dict[str, Any]:
    """The recorded facts of a config.json: its text model's keys in FACT_KEYS, plus what transformers derives."""
    text = dict(raw.get("text_config") or raw)
    text.setdefault("architectures", raw.get("architectures"))
    if "tie_word_embeddings" in raw and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    if isinstance(raw.get("quantization_config"), dict):
        text["quant_method"] = raw["quantization_config"].get("quant_method")
    facts = {k: text[k] for k in FACT_KEYS if text.get(k) is not None}
    if known_model_type(str(facts.get("model_type"))):
        view = hf_view(facts)
        for key in DERIVED_KEYS:
            if key not in facts and getattr(view, key, None) is not None:
                facts[key] = getattr(view, key)
    return facts


def hf_view(facts: dict[str, Any]):
    """The facts as the config object the trainer derives the draft from (transformers' class when it has one)."""
    if known_model_type(str(facts.get("model_type"))):
        from transformers import AutoConfig

        args = {k: v for k, v in facts.items() if k not in ("model_type", "quant_method")}
        return AutoConfig.for_model(facts["model_type"], **args)
    return SimpleNamespace(**facts)


def experts(facts: dict[str, Any]) -> int:
    return int(next((facts[k] for k in EXPERT_KEYS if facts.get(k)), 0))


def is_mla(facts: dict[str, Any]) -> bool:
    return bool(facts.get("kv_lora_rank"))


def linear_layers(facts: dict[str, Any]) -> list[int]:
    return [i for i, t in enumerate(facts.get("layer_types") or []) if "linear" in str(t)]


def mlp_kinds(facts: dict[str, Any]) -> list[str]:
    """'moe' or 'dense' per decoder layer, from whichever MoE placement keys the family uses."""
    n = int(facts["num_hidden_layers"])
    if not experts(facts):
        return ["dense"] * n
    dense_first = int(facts.get("first_k_dense_replace") or 0)
    freq = int(facts.get("moe_layer_freq") or 1)
    step = int(facts.get("decoder_sparse_step") or facts.get("interleave_moe_layer_step") or 1)
    only_dense = set(facts.get("mlp_only_layers") or [])
    return ["moe" if i >= dense_first and i % freq == 0 and (i + 1) % step == 0 and i not in only_dense
            else "dense" for i in range(n)]


def estimate_params(facts: dict[str, Any]) -> tuple[float, float]:
    """(total, routed-expert) parameter counts from the facts: embeddings, attention, MLPs; norms ignored."""
    h, v = int(facts["hidden_size"]), int(facts["vocab_size"])
    heads = int(facts["num_attention_heads"])
    kv = int(facts.get("num_key_value_heads") or heads)
    hd = int(facts.get("head_dim") or h // heads)
    total = v * h * (1 if facts.get("tie_word_embeddings") else 2)
    if is_mla(facts):
        qk, q_rank = int(facts["qk_nope_head_dim"]) + int(facts["qk_rope_head_dim"]), facts.get("q_lora_rank")
        q = h * q_rank + q_rank * heads * qk if q_rank else h * heads * qk
        kv_proj = h * (int(facts["kv_lora_rank"]) + int(facts["qk_rope_head_dim"]))
        kv_proj += int(facts["kv_lora_rank"]) * heads * (int(facts["qk_nope_head_dim"]) + int(facts["v_head_dim"]))
        attention = q + kv_proj + heads * int(facts["v_head_dim"]) * h
    else:
        gate = 2 if facts.get("model_type") == "qwen3_next" else 1  # gated attention: q_proj also yields the gate
        attention = h * heads * hd * (1 + gate) + 2 * h * kv * hd
    linear = set(linear_layers(facts))
    if linear:
        keys = int(facts["linear_num_key_heads"]) * int(facts["linear_key_head_dim"])
        values = int(facts["linear_num_value_heads"]) * int(facts["linear_value_head_dim"])
        delta_net = h * (2 * keys + 2 * values + 2 * int(facts["linear_num_value_heads"])) + values * h
        delta_net += (2 * keys + values) * int(facts.get("linear_conv_kernel_dim") or 4)
    expert_width = int(facts.get("moe_intermediate_size") or facts["intermediate_size"])
    dense_width = int(facts.get("intermediate_size_mlp") or facts["intermediate_size"])
    shared = int(facts.get("shared_expert_intermediate_size") or 0)
    shared += int(facts.get("n_shared_experts") or facts.get("num_shared_experts") or 0) * expert_width
    if facts.get("model_type") == "llama4_text":
        shared = int(facts["intermediate_size"])  # one shared expert of the expert width
    routed = 0
    for i, kind in enumerate(mlp_kinds(facts)):
        total += delta_net if i in linear else attention
        if kind == "moe":
            routed += experts(facts) * 3 * h * expert_width
            total += 3 * h * shared + h * experts(facts)
        else:
            total += 3 * h * dense_width
    return float(total + routed), float(routed)


def weight_bytes(facts: dict[str, Any], total: float, routed: float) -> float:
    """The target's weights as shipped (and as transformers and the engines hold them): fp8, mxfp4 experts, or bf16."""
    method = str(facts.get("quant_method") or "")
    if method == "fp8":
        return total
    if method == "mxfp4":  # experts in 4.25-bit MXFP4, the rest bf16
        return routed * 4.25 / 8 + (total - routed) * 2
    return total * 2
