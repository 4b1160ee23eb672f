"""Load an exported draft directory the way an engine does (EAGLE-3: SGLang / vLLM / speculators
layouts; DFlash: vLLM's `qwen3_dflash`), so the built-in decoder measures what a server would run;
`load_decoder` picks the decoder of the directory's family for every caller (eval, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from draftforge.decode.dflash import BlockDecoder
from draftforge.decode.eagle3 import SpeculativeDecoder
from draftforge.draft.config import DraftModelConfig, layer_fields
from draftforge.draft.dflash import DFlashDraft
from draftforge.draft.model import Eagle3Draft
from draftforge.export.dflash_export import read_config
from draftforge.layouts import MIDLAYER, aux_layer_ids_of, eagle3_layer, is_dflash
from draftforge.target.hf import text_config


def load_draft_dir(
    path: str | Path, target_model: nn.Module | None = None, dtype: torch.dtype = torch.float32
) -> Eagle3Draft:
    """Build the draft from an exported directory the way SGLang / vLLM do.

    Shape and RoPE come from config.json (the speculators layout keeps them in
    `transformer_layer_config`); aux taps from the top-level `eagle_aux_hidden_state_layer_ids`
    (HF index, what vLLM reads), else SGLang's `eagle_config` ids + 1; `d2t` / `t2d` from the
    weights; the embedding from the target, never from the directory.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    layer, prefix = eagle3_layer(config)
    aux = aux_layer_ids_of(config)
    if aux is None:
        if target_model is None:
            raise ValueError(f"{path}: no aux layer ids in config.json and no target to derive the default from")
        n = text_config(target_model.config).num_hidden_layers
        aux = [2, n // 2, n - 3]  # what engines silently fall back to; `export --check` flags it
    cfg = DraftModelConfig(**layer_fields(layer), aux_layer_ids=list(aux))
    weights: dict[str, Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    state = {k.replace(prefix, MIDLAYER, 1) if k.startswith(prefix) else k: v for k, v in weights.items()}
    state.pop("embed_tokens.weight", None)  # engines share the target's embedding
    draft = Eagle3Draft(cfg)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "embed_tokens.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: missing weights {missing}, unexpected weights {unexpected}")
    draft.set_vocab_mapping(state["d2t"], state["t2d"])  # re-checks that d2t and t2d agree
    if target_model is not None:
        tcfg = text_config(target_model.config)
        if cfg.target_hidden_size != tcfg.hidden_size or cfg.vocab_size != tcfg.vocab_size:
            raise ValueError(
                f"{path}: draft expects target hidden {cfg.target_hidden_size} / vocab {cfg.vocab_size}, "
                f"target has {tcfg.hidden_size} / {tcfg.vocab_size}"
            )
        if not all(0 <= i < tcfg.num_hidden_layers for i in cfg.aux_layer_ids):
            raise ValueError(f"{path}: aux ids {cfg.aux_layer_ids} outside the target's layers")
        draft.load_target_embedding(target_model.get_input_embeddings().weight.detach().float())
        device = target_model.get_input_embeddings().weight.device
        draft = draft.to(device)
    return draft.to(dtype).eval().requires_grad_(False)


def load_dflash_dir(path: str | Path, target_model: nn.Module | None = None,
                    dtype: torch.dtype = torch.float32) -> DFlashDraft:
    """Build the draft from an exported directory as vLLM does: shape, RoPE, mask token and taps from
    config.json, weights from safetensors, embedding (and a full-vocabulary head) from the target.
    Equal k_norm weights load as one shared k_norm; distinct ones are kept per layer."""
    path = Path(path)
    cfg = read_config(json.loads((path / "config.json").read_text()))
    state: dict[str, Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    state.pop("embed_tokens.weight", None)
    norms = [state.get(f"layers.{n}.self_attn.k_norm.weight") for n in range(cfg.num_layers)]
    cfg.shared_k_norm = all(w is not None and torch.equal(w, norms[0]) for w in norms)
    if cfg.shared_k_norm:
        for n in range(1, cfg.num_layers):
            del state[f"layers.{n}.self_attn.k_norm.weight"]
    draft = DFlashDraft(cfg)
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in ("embed_tokens.weight", "d2t", "t2d")]
    if missing or unexpected:
        raise ValueError(f"{path}: missing weights {missing}, unexpected weights {unexpected}")
    if not cfg.full_vocab:
        if d2t is None:
            raise ValueError(f"{path}: a reduced-vocabulary draft without d2t")
        ids = d2t.long() + torch.arange(len(d2t))
        if t2d is None:
            t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool).index_fill_(0, ids.clamp(0, cfg.vocab_size - 1), True)
        draft.set_vocab_mapping(d2t, t2d)
    if target_model is not None:
        tcfg = text_config(target_model.config)
        if cfg.hidden_size != tcfg.hidden_size or cfg.vocab_size != tcfg.vocab_size:
            raise ValueError(f"{path}: draft expects target hidden {cfg.hidden_size} / vocab {cfg.vocab_size}, "
                             f"target has {tcfg.hidden_size} / {tcfg.vocab_size}")
        if not all(0 <= i < tcfg.num_hidden_layers for i in cfg.aux_layer_ids):
            raise ValueError(f"{path}: taps {cfg.aux_layer_ids} (HF index) outside the target's layers")
        draft.load_target_embedding(target_model.get_input_embeddings().weight.detach().float())
        draft = draft.to(target_model.get_input_embeddings().weight.device)
    draft = draft.to(dtype).eval().requires_grad_(False)
    if target_model is not None:
        draft.load_target_head(target_model.get_output_embeddings().weight.detach().to(dtype))
    return draft


def load_decoder(path: str | Path, target_model: nn.Module, dtype: torch.dtype = torch.float32) -> SpeculativeDecoder:
    """The built-in decoder for an exported directory: a `BlockDecoder` over its DFlash draft, else a
    `SpeculativeDecoder` over its EAGLE-3 draft (the family is read from config.json, as engines do)."""
    if is_dflash(json.loads((Path(path) / "config.json").read_text())):  # docs/dflash.md
        return BlockDecoder(target_model, load_dflash_dir(path, target_model, dtype))
    return SpeculativeDecoder(target_model, load_draft_dir(path, target_model, dtype))
