"""Built-in speculative decoding with a DFlash block draft, as vLLM runs one.

One cycle, for committed tokens x[0..N-1] where the target has cached x[0..N-2] and the draft holds
context keys / values for positions 0..N-2 (from the target's taps there):
1. draft: ONE forward of the block [x[N-1], MASK x K] at positions N-1..N-1+K over that context;
   block position j proposes the token at N-1+j (argmax, or a sample of its distribution q_j).
2. verify: one target forward over the chain [x[N-1], d_1..d_K] (the EAGLE-3 decoder's target
   runner, masks and cache helpers), which also yields the taps of those positions.
3. accept: the EAGLE-3 decoder's rule: greedy walks the chain along the target's argmax; sampling
   accepts d_j with prob min(1, p_j(d_j) / q_j(d_j)) and resamples max(p - q, 0) at the first
   rejection. q_j does not depend on d_<j (the block is drafted in parallel), which keeps this
   exact: every emitted token is a sample of the target's conditional distribution.
4. commit: the target cache keeps the accepted tokens; the draft's context grows by the taps of
   x[N-1] and the accepted drafts (the bonus token starts the next block, without context of its own).

K + 1 block positions are fed, like vLLM's `num_speculative_tokens = K`: the block is bidirectional,
so K below block_size - 1 runs a shorter block than the one trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import DynamicCache

from draftforge.draft.dflash import DFlashDraft
from draftforge.eval.speculate import (
    SpecConfig,
    SpecStats,
    SpeculativeDecoder,
    _keep_cache,
    _left_pad,
    _pick,
    _sample,
    _select_rows_cache,
    _Tree,
)
from draftforge.export.dflash_export import read_config
from draftforge.target.hf import text_config


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


@dataclass
class _BlockState:
    rows: Tensor  # [B] index of each live row in the caller's prompt list
    cache: DynamicCache  # target KV, one slot per committed token except the last
    ctx_k: Tensor  # [B, layers, Hkv, S, D] the draft's context keys over the same slots
    ctx_v: Tensor
    valid: Tensor  # [B, S] slot holds a committed token of this row
    pos: Tensor  # [B, S] its position
    length: Tensor  # [B] position of the last committed token
    last: Tensor  # [B] the last committed token (not yet through the target)


class BlockDecoder(SpeculativeDecoder):
    """Chain speculative decoding of an HF target with a `DFlashDraft` (`generate` is the EAGLE-3
    decoder's; prefill, drafting, commit and row dropping are the block draft's)."""

    def __init__(self, target: nn.Module, draft: DFlashDraft) -> None:
        super().__init__(target, draft)  # type: ignore[arg-type]  # the same taps / vocabulary interface

    def _context(self, aux: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.draft.context_kv(self.draft.context(aux.to(self.ddtype)), pos)
        return torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)

    def _prefill(self, prompts: Sequence[Sequence[int]], temperature: float, gen) -> tuple[_BlockState, Tensor]:
        ids, valid = _left_pad(prompts, self.target.device)
        P = ids.shape[1]
        pos = (valid.cumsum(1) - 1).clamp(min=0)
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)
        attend = (torch.ones(P, P, dtype=torch.bool, device=ids.device).tril() & valid[:, None, :]) | eye
        cache = DynamicCache()
        logits, aux = self.target.forward(ids, pos, cache, attend, pos, logits_to_keep=1)
        first = _pick(logits[:, -1], temperature, gen)
        k, v = self._context(aux, pos)
        rows = torch.arange(len(prompts), device=ids.device)
        return _BlockState(rows, cache, k, v, valid, pos, valid.sum(1), first), first

    def _draft(self, st: _BlockState, spec: SpecConfig, temperature: float, gen) -> _Tree:  # type: ignore[override]
        K, d, dev = spec.steps, self.draft, st.valid.device
        if spec.topk != 1 or spec.draft_tokens != K + 1 or K > d.config.drafted:
            raise ValueError(f"a block draft drafts one chain of at most {d.config.drafted} tokens "
                             f"(batch,K,1,K+1), got {spec.key}")
        B, T = st.valid.shape[0], K + 1
        ids = d.block_ids(st.last)[:, None, :T]
        pos = (st.length[:, None] + torch.arange(T, device=dev))[:, None]
        kv = list(zip(st.ctx_k.unbind(1), st.ctx_v.unbind(1), strict=True))
        logits = d.logits(d.blocks(ids, pos, kv, st.valid[:, None])[:, 0, 1:]).float()  # [B, K, Dv]
        q = None
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = _sample(probs, gen)
            q = torch.zeros(B, K, self.vocab, dtype=torch.float32, device=dev)
            q[:, :, self.draft_ids] = probs
        else:
            tok = logits.argmax(-1)
        steps = torch.arange(T, device=dev)
        return _Tree(
            tokens=torch.cat([st.last[:, None], d.to_target_ids(tok)], 1),
            parent=(steps - 1).clamp(min=0).expand(B, T),
            depth=steps.expand(B, T),
            anc=torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T),
            q=q,
        )

    def _cycle(self, st: _BlockState, spec: SpecConfig, temperature: float, gen,  # type: ignore[override]
               stats: SpecStats) -> list[Tensor]:
        """Draft, verify, commit; returns the new tokens of each row ([n_b + 1] each)."""
        t0 = time.perf_counter()
        tree = self._draft(st, spec, temperature, gen)
        t1 = time.perf_counter()
        path, n, bonus, q_pos, aux = self._verify(st, tree, temperature, gen)
        t2 = time.perf_counter()
        B, S0 = st.valid.shape
        T = tree.tokens.shape[1]
        R = int(n.max()) + 1
        keep = path[:, :R]
        steps = torch.arange(R, device=n.device)[None]
        new = torch.where(steps < n[:, None], tree.tokens.gather(1, (keep + 1).clamp(max=T - 1)), bonus[:, None])
        _keep_cache(st.cache, S0, keep)
        new_pos = q_pos.gather(1, keep)
        k, v = self._context(aux.gather(1, keep[:, :, None].expand(-1, -1, aux.shape[-1])), new_pos)
        st.ctx_k, st.ctx_v = torch.cat([st.ctx_k, k], 3), torch.cat([st.ctx_v, v], 3)
        st.valid = torch.cat([st.valid, steps <= n[:, None]], dim=1)
        st.pos = torch.cat([st.pos, new_pos], dim=1)
        st.length = st.length + n + 1
        st.last = bonus
        self._record(stats, n, t0, t1, t2)
        return [new[b, : n[b] + 1] for b in range(B)]

    def _drop(self, st: _BlockState, keep: Tensor) -> None:  # type: ignore[override]
        _select_rows_cache(st.cache, keep)
        for name in ("rows", "ctx_k", "ctx_v", "valid", "pos", "length", "last"):
            setattr(st, name, getattr(st, name)[keep])
