"""An exported draft directory's config.json and weight names, read the way engines read them: which
family it holds, an EAGLE-3 draft's layer fields and weight prefix, and its aux taps.

At the bottom of the package so every reader shares one parser: serving needs the family to pick the
engine's speculative method, export to route a directory to its checker and check it, train to warm
start from it, eval to pick a decoder and load it.
"""

from __future__ import annotations

from typing import Any

DFLASH_ARCHITECTURE = "DFlashDraftModel"  # what vLLM's qwen3_dflash loader registers
# An EAGLE-3 draft layer's weight prefix: ours and SGLang's layout, and the speculators layout.
MIDLAYER, SPECULATORS_LAYER = "midlayer.", "layers.0."


def is_dflash(config: dict[str, Any]) -> bool:
    """A DFlash draft's config.json (or one that means to be: it has a dflash_config)."""
    return DFLASH_ARCHITECTURE in (config.get("architectures") or []) or "dflash_config" in config


def eagle3_layer(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(llama-style fields, weight prefix) of any EAGLE-3 draft config we know."""
    if config.get("speculators_model_type") == "eagle3":
        layer = dict(config.get("transformer_layer_config") or {})
        for key in ("draft_vocab_size", "target_hidden_size"):
            if key in config:
                layer[key] = config[key]
        return layer, SPECULATORS_LAYER
    return config, MIDLAYER


def aux_layer_ids_of(config: dict[str, Any]) -> list[int] | None:
    """The taps a draft dir declares, in HF index: vLLM's top-level field, else SGLang's eagle_config + 1."""
    if config.get("eagle_aux_hidden_state_layer_ids") is not None:
        return list(config["eagle_aux_hidden_state_layer_ids"])
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return None if nested is None else [i + 1 for i in nested]
