"""Built-in speculative decoding with a DFlash block draft, as vLLM runs one: `BlockDecoder`.

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from draftforge.decode.acceptance import pick, sample
from draftforge.decode.eagle3 import SpeculativeDecoder, Tree
from draftforge.decode.spec import SpecConfig
from draftforge.decode.target_runner import left_pad, select_rows_cache, slot_cache
from draftforge.draft.dflash import DFlashDraft


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

    def keep_rows(self, keep: Tensor) -> None:
        select_rows_cache(self.cache, keep)
        for name in ("rows", "ctx_k", "ctx_v", "valid", "pos", "length", "last"):
            setattr(self, name, getattr(self, name)[keep])


class BlockDecoder(SpeculativeDecoder):
    """Chain speculative decoding of an HF target with a `DFlashDraft` (verification, acceptance, the
    target's commit and `generate` are the EAGLE-3 decoder's; prefill, drafting and feeding the draft
    are the block draft's)."""

    def __init__(self, target: nn.Module, draft: DFlashDraft) -> None:
        super().__init__(target, draft)  # type: ignore[arg-type]  # the same taps / vocabulary interface

    def _draft_linears(self) -> tuple[nn.Module, ...]:
        """The draft and, for a full vocabulary, its head: the target's lm_head, held outside its modules
        (a reduced vocabulary's own head is one of them, and the target's is then unused)."""
        d = self.draft
        return (d,) if d.lm_head is not None or d.shared_head is None else (d, d.shared_head)

    def _context(self, aux: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.draft.context_kv(self.draft.context(aux.to(self.ddtype)), pos)
        return torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)

    def _prefill(self, prompts: Sequence[Sequence[int]], temperature: float,  # type: ignore[override]
                 gen) -> tuple[_BlockState, Tensor]:
        ids, valid, pos, attend = left_pad(prompts, self.target.device)
        cache = slot_cache()
        logits, aux = self.target.forward(ids, pos, cache, attend, pos, logits_to_keep=1)
        first = pick(logits[:, -1], temperature, gen)
        k, v = self._context(aux, pos)
        rows = torch.arange(len(prompts), device=ids.device)
        return _BlockState(rows, cache, k, v, valid, pos, valid.sum(1), first), first

    def _draft(self, st: _BlockState, spec: SpecConfig, temperature: float, gen) -> Tree:  # type: ignore[override]
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
            tok = sample(probs, gen)
            q = torch.zeros(B, K, self.vocab, dtype=torch.float32, device=dev)
            q[:, :, self.draft_ids] = probs
        else:
            tok = logits.argmax(-1)
        steps = torch.arange(T, device=dev)
        return Tree(
            tokens=torch.cat([st.last[:, None], d.to_target_ids(tok)], 1),
            parent=(steps - 1).clamp(min=0).expand(B, T),
            depth=steps.expand(B, T),
            anc=torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T),
            q=q,
        )

    def _feed_draft(self, st: _BlockState, nxt: Tensor, n: Tensor, slot_ok: Tensor,  # type: ignore[override]
                    new_pos: Tensor, aux_path: Tensor) -> None:
        """The draft's context grows by the taps of the accepted path's positions."""
        k, v = self._context(aux_path, new_pos)
        st.ctx_k, st.ctx_v = torch.cat([st.ctx_k, k], 3), torch.cat([st.ctx_v, v], 3)
