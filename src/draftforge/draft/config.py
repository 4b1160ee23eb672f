"""Draft model config, derived from the target's Hugging Face config (docs/design.md §4.2).

The draft is one Llama decoder layer that must look like the target to the serving engine: same
hidden size, heads, RoPE and context length. Everything is read off the target so a user only
chooses the draft vocabulary size; `overrides` exists for the rare deliberate deviation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from draftforge.target.taps import default_aux_layers


class ConfigDict:
    """A draft config dataclass as a plain dict and back (the checkpoint's `draft_config`), and built
    from derived values plus deliberate overrides."""

    @classmethod
    def with_overrides(cls, values: dict[str, Any], overrides: dict[str, Any] | None) -> Any:
        unknown = set(overrides or {}) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise KeyError(f"unknown draft config override(s): {sorted(unknown)}")
        return cls(**{**values, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Unknown keys (from a newer or other family's config) are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class DraftModelConfig(ConfigDict):
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: list[int] = field(default_factory=list)  # HF hidden_states index convention
    hidden_act: str = "silu"
    tap_scales: list[float] | None = None  # per-tap input scale of fc while training; export folds it into fc

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} not in (0, {self.vocab_size}]")
        if len(self.aux_layer_ids) != 3:
            raise ValueError(f"EAGLE-3 taps exactly three target layers, got {self.aux_layer_ids}")
        self.aux_layer_ids = [int(i) for i in self.aux_layer_ids]
        if self.tap_scales is not None and len(self.tap_scales) != 3:
            raise ValueError(f"tap_scales needs one scale per tap, got {self.tap_scales}")

    @classmethod
    def from_target_config(
        cls,
        hf_config: Any,
        draft_vocab_size: int,
        aux_layers: list[int] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> DraftModelConfig:
        """Mirror the target's shape and RoPE; `aux_layers` in HF hidden_states indexing."""
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        n_layers = int(text.num_hidden_layers)
        theta, scaling = target_rope(text)
        values: dict[str, Any] = dict(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(text.intermediate_size),
            rms_norm_eps=float(getattr(text, "rms_norm_eps", None) or 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(getattr(text, "max_position_embeddings", None) or 4096),
            vocab_size=int(text.vocab_size),
            draft_vocab_size=int(draft_vocab_size),
            target_hidden_size=hidden,
            aux_layer_ids=list(aux_layers) if aux_layers is not None else default_aux_layers(n_layers),
        )
        return cls.with_overrides(values, overrides)


def target_rope(text_config: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a transformers 5 or older config.

    transformers 5 keeps everything in `rope_parameters` (per layer type for Gemma-2/3-style
    configs: the global `full_attention` entry is the one a Llama layer should copy); older
    versions had `rope_theta` and `rope_scaling` attributes.
    """
    params = getattr(text_config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    if not isinstance(params, dict) or not params:
        params = dict(getattr(text_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(text_config, "rope_theta", None) or 10000.0)
    params = dict(params)
    theta = float(params.pop("rope_theta", None) or getattr(text_config, "rope_theta", None) or 10000.0)
    params.pop("partial_rotary_factor", None)  # the draft layer rotates the whole head
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params


def layer_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A draft layer's shape and RoPE as engines read them from its config.json (missing optional
    fields take the engines' defaults): what the EAGLE-3 and DFlash configs both start from."""
    theta, scaling = target_rope(SimpleNamespace(**config))
    heads = int(config["num_attention_heads"])
    return {
        "hidden_size": int(config["hidden_size"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // heads),
        "intermediate_size": int(config["intermediate_size"]),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(config.get("max_position_embeddings", 2048)),
        "vocab_size": int(config["vocab_size"]),
        "draft_vocab_size": int(config.get("draft_vocab_size") or config["vocab_size"]),
        "target_hidden_size": int(config.get("target_hidden_size") or config["hidden_size"]),
        "hidden_act": config.get("hidden_act", "silu"),
    }
