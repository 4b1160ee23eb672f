"""The DFlash family's part of `build_training`: its taps, draft and objective (`draft.family: dflash`).

The rest of the setup (data, feature source, trainer, checkpoints, resume, ranks) is the one EAGLE-3
uses; the trainer gets `DFlashObjective` as the module it trains and stays blind to the family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from draftforge.config import ConfigError, RunConfig
from draftforge.draft.dflash import DFlashDraft
from draftforge.draft.dflash_config import DFlashConfig, default_mask_token, default_taps
from draftforge.train.dflash_objective import DFlashObjective

FAMILIES = ("eagle3", "dflash")


def check_family(config: RunConfig) -> None:
    if config.draft.family not in FAMILIES:
        raise ConfigError(f"draft.family {config.draft.family!r}: choose one of {FAMILIES}")
    if config.draft.family == "dflash" and (config.draft.normalize_taps or config.draft.init_from):
        raise ConfigError("draft.normalize_taps and draft.init_from are EAGLE-3 options (draft.family: eagle3)")


def target_taps(config: RunConfig) -> list[int] | None:
    """The taps the feature source must provide (HF index): the config's, else the family's default
    (None: EAGLE-3's default, which the target picks itself)."""
    if config.target.aux_layers or config.draft.family != "dflash":
        return config.target.aux_layers
    from transformers import AutoConfig

    from draftforge.assets import resolve_model_path

    hf = AutoConfig.from_pretrained(resolve_model_path(config.target.path),
                                    trust_remote_code=config.target.trust_remote_code)
    n = int(getattr(hf, "get_text_config", lambda: hf)().num_hidden_layers)
    return default_taps(n, config.draft.num_layers)


def build_dflash(config: RunConfig, target: Any, tokenizer: Any, say: Callable[..., None]
                 ) -> tuple[DFlashDraft, DFlashObjective]:
    """The draft (target embedding, and head when the vocabulary is full) and its objective. A reduced
    vocabulary (draft.draft_vocab_size below the target's) gets its own lm_head; the caller installs
    the vocabulary as for EAGLE-3."""
    d = config.draft
    vocab = int(getattr(target.config, "get_text_config", lambda: target.config)().vocab_size)
    mask = d.mask_token_id if d.mask_token_id is not None else default_mask_token(tokenizer)
    cfg = DFlashConfig.from_target_config(target.config, mask, d.block_size, d.num_layers,
                                          min(d.draft_vocab_size, vocab), target.aux_layers, d.overrides)
    draft = DFlashDraft(cfg)
    draft.load_target_embedding(target.embed_weight.float())
    draft.load_target_head(target.head.weight)
    say(f"DFlash draft: {cfg.num_layers} layer(s), block {cfg.block_size}, mask token {mask} "
        f"({tokenizer.convert_ids_to_tokens(mask)!r}), taps {cfg.aux_layer_ids} (HF index), "
        + ("the target's lm_head" if cfg.full_vocab else f"own lm_head over {cfg.draft_vocab_size:,} tokens"))
    return draft, DFlashObjective(draft, target.head, config.train.num_anchors, config.train.block_gamma)
