"""Hugging Face target backend: features from any AutoModelForCausalLM via forward hooks.

Hooks sit on exactly the tapped decoder layers (a pre-hook sees the layer's input, which is
`hidden_states[i]` in HF's convention) and on the final norm. The base model is called without
its lm_head, so no [B, L, V] logits are ever built here.

A right-padded batch is run without its attention mask: a causal decoder's valid row never sees a
later (padded) key, so its features are bit for bit those of the masked forward (tested for every
family), while SDPA keeps its `is_causal` kernel: with a padding mask the CPU flash kernel computes
and masks every key block (1.77x its causal time at L=2048, 1.05-1.07x at L <= 512, where its key
blocks are whole rows). Rows past a sample's length are zero, as a feature store serves them.
"""

from __future__ import annotations

import torch
from torch import nn

from draftforge.assets import resolve_model_path
from draftforge.target.base import TargetFeatures, TargetHead
from draftforge.target.taps import default_aux_layers


def text_config(config):
    """The language-model part of a config (multimodal wrappers keep it under text_config)."""
    return getattr(config, "get_text_config", lambda: config)()


def decoder(model: nn.Module) -> nn.Module:
    """The base model that owns the decoder layers (Llama-4's get_decoder() returns the wrapper itself)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    inner = getattr(base, "model", None)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList) and isinstance(inner, nn.Module):
        base = inner
    return base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = decoder(model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected .layers)")
    return layers


def final_norm(model: nn.Module) -> nn.Module:
    base = decoder(model)
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")


def norm_gain(norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The per-channel gain an RMS norm applies (Gemma's norms store gain - 1 as their weight)."""
    return weight + 1 if "Gemma" in type(norm).__name__ else weight


def check_aux_layers(aux_layers: list[int], config) -> None:
    """Refuse taps an engine cannot reproduce: out of range, or on a linear-attention layer. How many
    taps a draft reads is its family's business (EAGLE-3: three, checked by its config; DFlash: any)."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    if not aux_layers:
        raise ValueError("no target layers to tap")
    for i in aux_layers:
        if not 0 <= i < n:
            raise ValueError(f"aux layer {i} is outside 0..{n - 1} (HF hidden_states index)")
    types = getattr(cfg, "layer_types", None)
    if types:
        bad = [i for i in aux_layers if "linear" in str(types[i])]
        if bad:
            raise ValueError(f"aux layers {bad} are linear-attention layers ({[types[i] for i in bad]})")


class HFTarget:
    """A frozen HF causal LM that returns aux taps and the final hidden state."""

    def __init__(
        self,
        model: nn.Module,
        aux_layers: list[int] | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        cfg = text_config(model.config)
        self.aux_layers = list(aux_layers or default_aux_layers(cfg.num_hidden_layers))
        check_aux_layers(self.aux_layers, model.config)
        norm = final_norm(model)
        self.head = TargetHead(
            weight=model.get_output_embeddings().weight,
            logit_softcap=getattr(cfg, "final_logit_softcapping", None),
            norm_gain=norm_gain(norm, norm.weight.detach()) if getattr(norm, "weight", None) is not None else None,
        )
        self.embed_weight = model.get_input_embeddings().weight
        self._taps: dict[int, torch.Tensor] = {}
        self._final: torch.Tensor | None = None
        layers = decoder_layers(model)
        for i in self.aux_layers:
            layers[i].register_forward_pre_hook(self._tap(i), with_kwargs=True)
        norm.register_forward_hook(self._keep_final)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        aux_layers: list[int] | None = None,
        dtype: torch.dtype = torch.bfloat16,
        trust_remote_code: bool = False,
    ) -> HFTarget:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(path), dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(model, aux_layers)

    def _tap(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._taps[index] = hidden

        return hook

    def _keep_final(self, module, args, output) -> None:
        self._final = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TargetFeatures:
        """aux [B, L, 3*Ht] and final_hidden [B, L, Ht]; zero past each row's length when right padded."""
        self._taps.clear()
        valid = attention_mask.bool()
        right_padded = bool(torch.equal(valid, _prefix_mask(valid.sum(1), valid.shape[1])))
        decoder(self.model)(input_ids=input_ids, attention_mask=None if right_padded else attention_mask,
                            use_cache=False)
        aux = torch.cat([self._taps[i] for i in self.aux_layers], dim=-1)
        final, self._final = self._final, None
        self._taps.clear()
        if right_padded and not valid.all():
            aux.masked_fill_(~valid[..., None], 0)
            final.masked_fill_(~valid[..., None], 0)
        return TargetFeatures(aux=aux, final_hidden=final)


def _prefix_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length] bool, True at the first lengths[b] positions of row b."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
