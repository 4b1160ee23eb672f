"""EAGLE-3 chain / tree speculative decoding of an HF target: `SpeculativeDecoder`.

One cycle (docs/design.md section 7), for committed tokens x[0..N-1] where the target has cached x[0..N-2] and
the draft has cached indices 0..N-2 (index t holds embed(x[t+1]) with the target's aux[t]):
1. draft: `steps` levels; level 1 is the top-k of the draft's last pre-norm output, each later
   level expands the top-k frontier nodes (by cumulative draft log-prob) in one draft forward
   under a tree mask; the `draft_tokens - 1` best nodes form the tree (EAGLE-2 / SGLang).
   `topk == 1` is the chain of SGLang's `steps=K, topk=1, draft_tokens=K+1`; sampling a chain
   draws each level from the draft's q instead of taking its top-k.
2. verify: ONE target forward over [x[N-1], tree nodes], positions = N-1 + depth, a 4D mask
   over cache + ancestors-or-self; the aux taps of the same forward come from pre-hooks.
3. accept: `acceptance.py` (greedy tree walk; lossless sampling of chains and trees).
4. commit: the target cache keeps only the accepted path (its KV gathered into place), the
   draft's drafted entries are dropped and the accepted tokens are re-fed to the draft with the
   target's aux features of their positions, as engines do.

Batches: rows have their own lengths and acceptance; holes are masked, never shifted (see
`target_runner.py`), and finished rows leave the batch. `decode/dflash.py` reuses all but the
draft-specific steps (prefill, drafting, feeding the draft, dropping rows).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from draftforge.decode.acceptance import pick, reject_chain, sample, walk_tree
from draftforge.decode.packed import packed_linears
from draftforge.decode.plain import plain_generate
from draftforge.decode.spec import SpecConfig, SpecOutput, SpecStats
from draftforge.decode.target_runner import TargetRunner, keep_cache, left_pad, select_rows_cache, slot_cache
from draftforge.draft.model import Eagle3Draft
from draftforge.target.hf import text_config


@dataclass
class _State:
    rows: Tensor  # [B] index of each live row in the caller's prompt list
    cache: DynamicCache  # target KV, one slot per committed token except the last
    dkv: tuple[Tensor, Tensor]  # draft KV over the same slots
    valid: Tensor  # [B, S] slot holds a committed token of this row
    pos: Tensor  # [B, S] its position
    length: Tensor  # [B] valid slots = position of the last committed token
    last: Tensor  # [B] the last committed token (not yet through the target)
    hidden: Tensor  # [B, H] the draft's pre-norm output at the last slot (predicts the next token)

    def keep_rows(self, keep: Tensor) -> None:
        select_rows_cache(self.cache, keep)
        self.dkv = (self.dkv[0][keep], self.dkv[1][keep])
        for name in ("rows", "valid", "pos", "length", "last", "hidden"):
            setattr(self, name, getattr(self, name)[keep])


@dataclass
class Tree:
    """What a draft proposes in one cycle: a chain is the tree whose node i has parent i - 1."""

    tokens: Tensor  # [B, T] target ids, index 0 = root (the last committed token)
    parent: Tensor  # [B, T] index of the parent in the tree (root: 0)
    depth: Tensor  # [B, T]
    anc: Tensor  # [B, T, T] ancestor-or-self
    q: Tensor | None = None  # chain sampling: [B, T-1, V] draft distribution of each node


@dataclass
class _Nodes:
    """Every node the expansion drafted, in id order (level by level): scores, draft ids, parent ids."""

    score: Tensor  # [B, M] cumulative draft log-prob
    tok: Tensor  # [B, M] draft-vocabulary ids
    parent: Tensor  # [B, M] parent node id, -1 under the root
    depth: Tensor  # [B, M]
    q: list[Tensor]  # chain sampling: the draft's distribution at each level, [B, Vd] each


class SpeculativeDecoder:
    """EAGLE-3 chain / tree speculative decoding of an HF target with an `Eagle3Draft`."""

    def __init__(self, target: nn.Module, draft: Eagle3Draft) -> None:
        self.target = TargetRunner(target, draft.config.aux_layer_ids)
        self.draft = draft.eval().requires_grad_(False)
        self.vocab = text_config(target.config).vocab_size
        self.ddtype = next(draft.parameters()).dtype
        self.draft_ids = draft.to_target_ids(torch.arange(draft.config.draft_vocab_size, device=draft.d2t.device))

    # -- prefill ---------------------------------------------------------------------------------------

    def _prefill(self, prompts: Sequence[Sequence[int]], temperature: float, gen) -> tuple[_State, Tensor]:
        ids, valid, pos, attend = left_pad(prompts, self.target.device)
        cache = slot_cache()
        logits, aux = self.target.forward(ids, pos, cache, attend, pos, logits_to_keep=1)
        first = pick(logits[:, -1], temperature, gen)
        d_ids = torch.cat([ids[:, 1:], first[:, None]], dim=1)
        pre, dkv = self.draft.step(d_ids, self.draft.project(aux.to(self.ddtype)), pos, None, attend[:, None])
        state = _State(
            rows=torch.arange(len(prompts), device=ids.device), cache=cache, dkv=dkv, valid=valid, pos=pos,
            length=valid.sum(1), last=first, hidden=pre[:, -1],
        )  # fmt: skip
        return state, first

    # -- drafting --------------------------------------------------------------------------------------

    def _draft(self, st: _State, spec: SpecConfig, temperature: float, gen) -> Tree:
        """Expand `steps` levels (top-k frontier each), keep the draft_tokens-1 best nodes."""
        return self._select(st, spec, self._expand(st, spec, temperature, gen))

    def _expand(self, st: _State, spec: SpecConfig, temperature: float, gen) -> _Nodes:
        """Level 1: the top-k of the last hidden state; each later level: one draft forward of the top-k
        frontier under a tree mask, k children each. Sampling a chain draws one child from q instead."""
        d = self.draft
        B, S0, k = st.valid.shape[0], st.valid.shape[1], spec.topk
        sampling_chain = temperature > 0 and k == 1
        dev = st.valid.device

        def propose(logits: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            """logits [B, F, Vd] -> (scores, draft ids) [B, F, k], draft probs if sampling a chain."""
            if sampling_chain:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tok = sample(probs, gen)[..., None]
                return probs.gather(-1, tok).log(), tok, probs
            s, t = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
            return s, t, None

        score, tok, probs = propose(d.logits(st.hidden[:, None]))  # [B, 1, k]
        node_tok, node_score = [tok.flatten(1)], [score.flatten(1)]
        node_parent = [torch.full((B, k), -1, dtype=torch.long, device=dev)]
        node_depth = [torch.ones(B, k, dtype=torch.long, device=dev)]
        qs = [probs.flatten(1, 2)] if probs is not None else []
        f_id = torch.arange(k, device=dev).expand(B, k)  # frontier node ids
        f_score, f_tok, f_hidden = node_score[0], node_tok[0], st.hidden[:, None].expand(B, k, -1)
        anc = torch.zeros(B, k, 0, dtype=torch.bool, device=dev)  # drafted slots each frontier node sees
        kv = st.dkv
        base = k
        eye = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)
        levels = min(spec.steps, spec.draft_tokens - 1)  # deeper nodes could never be among the kept ones
        for level in range(2, levels + 1):
            attend = torch.cat([st.valid[:, None].expand(B, k, S0), anc, eye], dim=2)
            pos = (st.length + level - 2)[:, None].expand(B, k)
            pre, kv = d.step(d.to_target_ids(f_tok), f_hidden, pos, kv, attend[:, None])
            anc_q = torch.cat([anc, eye], dim=2)
            score, tok, probs = propose(d.logits(pre))  # [B, k, k]
            cand_score = (f_score[:, :, None] + score).flatten(1)
            node_score.append(cand_score)
            node_tok.append(tok.flatten(1))
            node_parent.append(f_id[:, :, None].expand(B, k, k).flatten(1))
            node_depth.append(torch.full((B, k * k), level, dtype=torch.long, device=dev))
            if probs is not None:
                qs.append(probs.flatten(1, 2))
            top = cand_score.topk(k, dim=1).indices  # next frontier among this level's candidates
            rows = top // k
            f_id, f_score, f_tok = base + top, cand_score.gather(1, top), tok.flatten(1).gather(1, top)
            f_hidden = pre.gather(1, rows[:, :, None].expand(-1, -1, pre.shape[-1]))
            anc = anc_q.gather(1, rows[:, :, None].expand(-1, -1, anc_q.shape[2]))
            base += k * k
        return _Nodes(torch.cat(node_score, 1), torch.cat(node_tok, 1), torch.cat(node_parent, 1),
                      torch.cat(node_depth, 1), qs)

    def _select(self, st: _State, spec: SpecConfig, nodes: _Nodes) -> Tree:
        """The draft_tokens - 1 best nodes under the root, in id order, with their tree structure."""
        B, dev = st.valid.shape[0], st.valid.device
        # Best nodes first; a stable sort puts a parent (lower id, score >= its child's) before its
        # children on ties, so the selection is closed under ancestors. Then back to id order.
        n = spec.draft_tokens - 1
        sel = torch.sort(nodes.score, dim=1, descending=True, stable=True).indices[:, :n].sort(dim=1).values
        tokens = torch.cat([st.last[:, None], self.draft.to_target_ids(nodes.tok.gather(1, sel))], dim=1)
        inv = torch.zeros(B, nodes.score.shape[1], dtype=torch.long, device=dev)
        inv.scatter_(1, sel, torch.arange(1, n + 1, device=dev).expand(B, n))
        par = nodes.parent.gather(1, sel)
        parent = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),
                            torch.where(par < 0, 0, inv.gather(1, par.clamp(min=0)))], dim=1)  # fmt: skip
        depth = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), nodes.depth.gather(1, sel)], dim=1)
        T = n + 1
        eyeT = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T)
        anc_t = eyeT
        for _ in range(min(spec.steps, n)):
            anc_t = eyeT | anc_t.gather(1, parent[:, :, None].expand(B, T, T))
        q = None
        if nodes.q:
            q = torch.zeros(B, n, self.vocab, dtype=torch.float32, device=dev)
            q[:, :, self.draft_ids] = torch.stack(nodes.q, 1)[:, :n]
        return Tree(tokens=tokens, parent=parent, depth=depth, anc=anc_t, q=q)

    # -- verification ----------------------------------------------------------------------------------

    def _accept(self, tree: Tree, logits: Tensor, temperature: float, gen) -> tuple[Tensor, Tensor, Tensor]:
        """(path [B, D+1] tree indices from the root, accepted count n [B], bonus token [B])."""
        if tree.q is not None:  # chain, rejection sampling against the draft's q
            p = torch.softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
            n, bonus = reject_chain(tree.tokens[:, 1:], tree.q, p, gen)
            B, T = tree.tokens.shape
            return torch.arange(T, device=n.device).expand(B, T), n, bonus
        # greedy (y = argmax) or target-only tree sampling (one y ~ p per node, drawn up front)
        return walk_tree(tree.tokens, tree.parent, tree.depth, pick(logits, temperature, gen))

    def _verify(self, st: _State, tree: Tree, temperature: float, gen) -> tuple[Tensor, ...]:
        """The target on the drafted tree after the committed tokens: (accepted path, accepted count n,
        bonus token, the tree's positions, the target's taps there)."""
        B, S0 = st.valid.shape
        T = tree.tokens.shape[1]
        q_pos = st.length[:, None] + tree.depth
        attend = torch.cat([st.valid[:, None].expand(B, T, S0), tree.anc], dim=2)
        logits, aux = self.target.forward(tree.tokens, q_pos, st.cache, attend, torch.cat([st.pos, q_pos], 1))
        path, n, bonus = self._accept(tree, logits, temperature, gen)
        return path, n, bonus, q_pos, aux

    # -- commit ----------------------------------------------------------------------------------------

    def _commit(self, st: _State, tree: Tree, path: Tensor, n: Tensor, bonus: Tensor, q_pos: Tensor,
                aux: Tensor) -> list[Tensor]:
        """Keep the accepted path in the target cache, feed it to the draft, advance the state; returns the
        new tokens of each row ([n_b + 1] each: the accepted drafts, then the bonus token)."""
        B, S0 = st.valid.shape
        R = int(n.max()) + 1
        path = torch.cat([path, path[:, -1:]], dim=1)  # room for the "next token" lookup below
        keep = path[:, :R]
        slot_ok = torch.arange(R, device=n.device)[None] <= n[:, None]
        path_tok = tree.tokens.gather(1, path[:, : R + 1])
        nxt = torch.where(torch.arange(R, device=n.device)[None] < n[:, None], path_tok[:, 1:], bonus[:, None])
        keep_cache(st.cache, S0, keep)
        new_pos = q_pos.gather(1, keep)
        aux_path = aux.gather(1, keep[:, :, None].expand(-1, -1, aux.shape[-1]))
        self._feed_draft(st, nxt, n, slot_ok, new_pos, aux_path)
        st.valid = torch.cat([st.valid, slot_ok], dim=1)
        st.pos = torch.cat([st.pos, new_pos], dim=1)
        st.length = st.length + n + 1
        st.last = bonus
        return [nxt[b, : n[b] + 1] for b in range(B)]

    def _feed_draft(self, st: _State, nxt: Tensor, n: Tensor, slot_ok: Tensor, new_pos: Tensor,
                    aux_path: Tensor) -> None:
        """Drop the drafted KV entries and re-feed the accepted tokens with the target's taps of their
        positions (slot_ok [B, R]: the slot holds an accepted token of this row; `st` still has the old slots)."""
        B, S0 = st.valid.shape
        R = nxt.shape[1]
        causal = torch.ones(R, R, dtype=torch.bool, device=n.device).tril()
        eye = torch.eye(R, dtype=torch.bool, device=n.device)
        d_attend = torch.cat([st.valid[:, None].expand(B, R, S0), (causal & slot_ok[:, None, :]) | eye], dim=2)
        dkv = (st.dkv[0][:, :, :S0], st.dkv[1][:, :, :S0])  # drop the drafted entries
        hidden_in = self.draft.project(aux_path.to(self.ddtype))
        pre, st.dkv = self.draft.step(nxt, hidden_in, new_pos, dkv, d_attend[:, None])
        st.hidden = pre.gather(1, n[:, None, None].expand(-1, 1, pre.shape[-1]))[:, 0]

    # -- one cycle, and the loop -----------------------------------------------------------------------

    def _cycle(self, st: _State, spec: SpecConfig, temperature: float, gen, stats: SpecStats) -> list[Tensor]:
        """Draft, verify, commit; returns the new tokens of each row ([n_b + 1] each)."""
        t0 = time.perf_counter()
        tree = self._draft(st, spec, temperature, gen)
        t1 = time.perf_counter()
        path, n, bonus, q_pos, aux = self._verify(st, tree, temperature, gen)
        t2 = time.perf_counter()
        new = self._commit(st, tree, path, n, bonus, q_pos, aux)
        stats.accepted += n.tolist()
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.commit_s += time.perf_counter() - t2
        return new

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        spec: SpecConfig,
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> SpecOutput:
        """New tokens for each prompt (all prompts decoded together as one batch); the target's and the
        draft's linears run on packed weights (`packed.py`)."""
        with packed_linears(self.target.model, *self._draft_linears()):
            return self._generate(prompts, spec, max_new_tokens, temperature, eos_token_ids, generator)

    def _draft_linears(self) -> tuple[nn.Module, ...]:
        """The draft's modules that decoding packs (`generate`)."""
        return (self.draft,)

    def _generate(self, prompts: Sequence[Sequence[int]], spec: SpecConfig, max_new_tokens: int, temperature: float,
                  eos_token_ids: Sequence[int], generator: torch.Generator | None) -> SpecOutput:
        stats = SpecStats(steps=spec.steps)
        outs: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens <= 0:
            return SpecOutput(outs, stats)
        if spec.steps == 0:
            return SpecOutput(
                plain_generate(self.target.model, prompts, max_new_tokens, temperature, eos_token_ids, generator), stats
            )
        eos = set(eos_token_ids)
        st, first = self._prefill(prompts, temperature, generator)
        new = [first[b : b + 1] for b in range(len(prompts))]
        while True:
            done = []
            for b, toks in enumerate(new):
                row = outs[int(st.rows[b])]
                for t in toks.tolist():
                    row.append(t)
                    if t in eos or len(row) >= max_new_tokens:
                        break
                done.append(row[-1] in eos or len(row) >= max_new_tokens)
            if all(done):
                return SpecOutput(outs, stats)
            if any(done):
                st.keep_rows(torch.tensor([not x for x in done], device=st.valid.device).nonzero()[:, 0])
            new = self._cycle(st, spec, temperature, generator, stats)
