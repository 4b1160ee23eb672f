"""The target, driven with our own masks and positions, and the KV cache and its surgery the decoders share.

Cache slots are never shifted per row: a validity mask and explicit per-slot positions make holes
(left padding, a row that accepted fewer tokens than the longest one) invisible. The cache
(`slot_cache`) appends in place into buffers that grow by doubling, where HF's DynamicCache copies
every layer's whole cache at every step, and the commit's surgery (`keep_cache`) writes in place too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from draftforge.decode.lean_target import lean_forward, lean_supported
from draftforge.target.hf import decoder_layers, text_config


class TargetRunner:
    """An HF causal LM called with a DynamicCache, explicit positions and a 4D mask; aux taps by pre-hooks.

    Llama-shaped families run `lean_forward` (the same math without HF's per-step overhead), every
    other family HF's own forward.

    The mask is additive float (0 / dtype min): eager and sdpa attention both take it. Models with
    sliding-window layers get one mask per layer type (the dict their forward accepts); a
    model whose every layer slides (Mistral) gets the window folded into its single mask.
    """

    def __init__(self, model: nn.Module, aux_layers: Sequence[int]) -> None:
        self.model = model.eval().requires_grad_(False)
        cfg = text_config(model.config)
        self.layers = decoder_layers(model)
        self.aux_layers = list(aux_layers)
        self.window = getattr(cfg, "sliding_window", None)
        self.layer_types = sorted(set(getattr(cfg, "layer_types", None) or []))
        if set(self.layer_types) - {"full_attention", "sliding_attention"}:
            raise NotImplementedError(f"layer types {self.layer_types} are not supported by the built-in decoder")
        self.dtype = model.get_input_embeddings().weight.dtype
        self.device = model.get_input_embeddings().weight.device
        self.lean = lean_supported(model)
        self._taps: dict[int, Tensor] = {}

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            self._taps[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def mask(self, attend: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | dict[str, Tensor]:
        """attend [B, T, K] bool -> what the model's forward takes as attention_mask."""

        def additive(a: Tensor) -> Tensor:
            zero = torch.zeros((), dtype=self.dtype, device=a.device)
            return torch.where(a, zero, torch.finfo(self.dtype).min)[:, None]

        if not self.window or self.layer_types == ["full_attention"]:
            return additive(attend)
        sliding = attend & ((q_pos[:, :, None] - k_pos[:, None, :]) < self.window)
        if not self.layer_types:  # every layer slides
            return additive(sliding)
        return {t: additive(sliding if t == "sliding_attention" else attend) for t in self.layer_types}

    def forward(
        self, ids: Tensor, q_pos: Tensor, cache: DynamicCache, attend: Tensor | None, k_pos: Tensor,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """(logits [B, T or keep, V], aux [B, T, 3*H_t]); appends T entries to `cache`. `attend` None: every
        query sees all keys before it (rows without holes: a single query, or a prefill into an empty cache)."""
        if self.lean:
            mask = None if attend is None else self.mask(attend, q_pos, k_pos)
            logits, taps = lean_forward(self.model, ids, q_pos, cache, mask, self.aux_layers, logits_to_keep)
            return logits, torch.cat(taps, dim=-1) if taps else ids.new_empty(0)
        handles = [self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in self.aux_layers]
        try:
            where = {} if attend is None else {"attention_mask": self.mask(attend, q_pos, k_pos), "position_ids": q_pos}
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep, **where)
        finally:
            for h in handles:
                h.remove()
        # the same layer may be tapped twice (default taps of a shallow model), so read, then clear
        aux = torch.cat([self._taps[i] for i in self.aux_layers], dim=-1) if self.aux_layers else ids.new_empty(0)
        self._taps.clear()
        return out.logits, aux


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A prompt batch, left padded: ids, valid [B, P] (not padding), positions [B, P] and the prefill's
    `attend` [B, P, P]: causal over valid keys, and every query sees itself. HF's padding masks leave pad
    queries with no key at all, which turns into NaN keys and values in the cache for some families
    (Gemma-2, eager attention) and poisons the whole row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        if not len(p):
            raise ValueError("empty prompt")
        ids[b, width - len(p) :] = torch.as_tensor(list(p))
        valid[b, width - len(p) :] = True
    ids, valid = ids.to(device), valid.to(device)
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    eye = torch.eye(width, dtype=torch.bool, device=device)
    attend = (torch.ones(width, width, dtype=torch.bool, device=device).tril() & valid[:, None, :]) | eye
    return ids, valid, pos, attend


class _SlotLayer(DynamicLayer):
    """A DynamicLayer whose keys / values are the first `length` slots of buffers with room to spare.

    `update` writes the new entries in place (growing a buffer to twice what it needs when full);
    assigning a prefix view of the buffer (`crop`, `keep_cache`) shortens the layer in place, any
    other tensor (a row selection) becomes the new buffer.
    """

    def __init__(self, **kwargs) -> None:
        self._buf: dict[str, Tensor | None] = {"keys": None, "values": None}
        self.length = 0
        super().__init__(**kwargs)

    def _get(self, name: str) -> Tensor | None:
        buf = self._buf[name]
        return buf if buf is None or buf.dim() < 4 else buf[:, :, : self.length]

    def _set(self, name: str, x: Tensor | None) -> None:
        buf = self._buf[name]
        if x is None or x.dim() < 4:  # unset, or DynamicLayer's empty placeholder
            self._buf[name], self.length = x, 0
        elif buf is not None and buf.dim() == 4 and x.data_ptr() == buf.data_ptr() and x.stride() == buf.stride():
            self.length = x.shape[2]  # a prefix view of the buffer
        else:
            self._buf[name], self.length = x, x.shape[2]

    keys = property(lambda self: self._get("keys"), lambda self, x: self._set("keys", x))  # type: ignore[assignment]
    values = property(lambda self: self._get("values"), lambda self, x: self._set("values", x))  # type: ignore[assignment]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.length, key_states.shape[2]
        for name, new in (("keys", key_states), ("values", value_states)):
            buf = self._buf[name]
            if buf is None or buf.dim() < 4 or buf.shape[2] < n + t:
                grown = new.new_empty(*new.shape[:2], 2 * (n + t), new.shape[3])
                if n:
                    grown[:, :, :n] = buf[:, :, :n]
                self._buf[name] = buf = grown
            buf[:, :, n : n + t] = new
        self.length = n + t
        return self.keys, self.values


def slot_cache() -> DynamicCache:
    """An empty target cache that appends in place (`_SlotLayer`); HF's models take it as a DynamicCache."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SlotLayer
    return cache


def _gather_seq(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, S, D], index [B, R] -> x[b, :, index[b], :]."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def keep_cache(cache: DynamicCache, keep_from: int, index: Tensor) -> None:
    """Keep slots [0, keep_from) and, after them, the slots keep_from + index[b] of each row (in place)."""
    end = keep_from + index.shape[1]
    for layer in cache.layers:
        for x in (layer.keys, layer.values):
            x[:, :, keep_from:end] = _gather_seq(x, keep_from + index)
        layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]


def select_rows_cache(cache: DynamicCache, rows: Tensor) -> None:
    """Keep only these batch rows (finished rows leave the batch)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]
