"""Built-in EAGLE-3 speculative decoder: measure a draft's acceptance length and speedup without a server.

    draftforge eval --draft DIR --target smollm2 --suite mtbench --configs 1,3,1,4 1,3,4,8

The draft is read from its exported directory exactly as an engine reads it (config rope and aux
taps, `d2t` / `t2d` from the weights, the target's embedding); see `load_draft_dir`.

One cycle (docs/design.md section 7), for committed tokens x[0..N-1] where the target has cached x[0..N-2] and
the draft has cached indices 0..N-2 (index t holds embed(x[t+1]) with the target's aux[t]):
1. draft: `steps` levels; level 1 is the top-k of the draft's last pre-norm output, each later
   level expands the top-k frontier nodes (by cumulative draft log-prob) in one draft forward
   under a tree mask; the `draft_tokens - 1` best nodes form the tree (EAGLE-2 / SGLang).
   `topk == 1` is the chain of SGLang's `steps=K, topk=1, draft_tokens=K+1`.
2. verify: ONE target forward over [x[N-1], tree nodes], positions = N-1 + depth, a 4D mask
   over cache + ancestors-or-self; the aux taps of the same forward come from pre-hooks.
3. accept: greedy walks the tree along the target's argmax; sampling is lossless (below).
4. commit: the target cache keeps only the accepted path (its KV gathered into place), the
   draft's drafted entries are dropped and the accepted tokens are re-fed to the draft with the
   target's aux features of their positions, as engines do.

Sampling (temperature > 0): a chain drafts by sampling q and verifies by standard rejection
sampling (accept d with prob min(1, p(d)/q(d)), else sample max(p - q, 0)); a tree keeps its
deterministic top-k nodes and verifies "target-only": at each node one token y ~ p is drawn and
the walk moves to the child equal to y, or stops and emits y. Every emitted token is a sample of
the target's conditional distribution, so both are lossless; the tree form is the multi-candidate
rule of SpecInfer with one-hot proposals (SGLang's `tree_speculative_sampling_target_only`).

Batches: rows have their own lengths and acceptance. Cache slots are never shifted per row:
a validity mask and explicit per-slot positions make holes (left padding, a row that accepted
fewer tokens than the longest one) invisible, and finished rows leave the batch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import DynamicCache

from draftforge.draft.config import DraftModelConfig, target_rope
from draftforge.draft.model import Eagle3Draft
from draftforge.eval.ngram import NGRAM, LookupStats
from draftforge.export.formats import aux_layer_ids_of
from draftforge.target.hf import decoder_layers, text_config

# ---- configs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecConfig:
    """(batch, steps, topk, draft_tokens) as SGLang names them; steps == 0 means no speculation."""

    batch: int = 1
    steps: int = 3
    topk: int = 1
    draft_tokens: int = 4

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.steps == 0:
            return
        if self.steps < 0 or self.topk < 1:
            raise ValueError(f"steps >= 0 and topk >= 1 required, got {self}")
        if not 2 <= self.draft_tokens <= 1 + self.max_nodes:
            raise ValueError(
                f"draft_tokens={self.draft_tokens} must be in [2, {1 + self.max_nodes}] for steps={self.steps}, "
                f"topk={self.topk} (root + at most topk + (steps-1)*topk^2 drafted nodes)"
            )

    @property
    def max_nodes(self) -> int:
        return self.topk + (self.steps - 1) * self.topk**2

    @property
    def key(self) -> str:
        return f"{self.batch},{self.steps},{self.topk},{self.draft_tokens}"

    @classmethod
    def parse(cls, text: str) -> SpecConfig:
        parts = [int(p) for p in text.replace(" ", "").split(",")]
        if len(parts) != 4:
            raise ValueError(f"config {text!r} is not batch,steps,topk,draft_tokens")
        return cls(*parts)


# ---- loading an exported draft ---------------------------------------------------------------------


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
    layer = dict(config)
    prefix = "midlayer."
    if config.get("speculators_model_type") == "eagle3":
        layer = {**config.get("transformer_layer_config", {})}
        for key in ("draft_vocab_size", "target_hidden_size"):
            if key in config:
                layer[key] = config[key]
        prefix = "layers.0."
    aux = aux_layer_ids_of(config)
    if aux is None:
        if target_model is None:
            raise ValueError(f"{path}: no aux layer ids in config.json and no target to derive the default from")
        n = text_config(target_model.config).num_hidden_layers
        aux = [2, n // 2, n - 3]  # what engines silently fall back to; `export --check` flags it
    theta, scaling = target_rope(_Attrs(layer))
    heads = int(layer["num_attention_heads"])
    cfg = DraftModelConfig(
        hidden_size=int(layer["hidden_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=int(layer.get("head_dim") or layer["hidden_size"] // heads),
        intermediate_size=int(layer["intermediate_size"]),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(layer.get("max_position_embeddings", 2048)),
        vocab_size=int(layer["vocab_size"]),
        draft_vocab_size=int(layer.get("draft_vocab_size", layer["vocab_size"])),
        target_hidden_size=int(layer.get("target_hidden_size") or layer["hidden_size"]),
        aux_layer_ids=list(aux),
        hidden_act=layer.get("hidden_act", "silu"),
    )
    weights: dict[str, Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    state = {k.replace(prefix, "midlayer.", 1) if k.startswith(prefix) else k: v for k, v in weights.items()}
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


class _Attrs:
    """A dict seen as a config object (for `target_rope`, which reads attributes)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    def __getattr__(self, name: str) -> Any:
        return None


# ---- the target, driven with our own masks -----------------------------------------------------------


class TargetRunner:
    """An HF causal LM called with a DynamicCache, explicit positions and a 4D mask; aux taps by pre-hooks.

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
        self, ids: Tensor, q_pos: Tensor, cache: DynamicCache, attend: Tensor, k_pos: Tensor, logits_to_keep: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(logits [B, T or keep, V], aux [B, T, 3*H_t]); appends T entries to `cache`."""
        handles = [self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in self.aux_layers]
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask(attend, q_pos, k_pos),
                position_ids=q_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
        finally:
            for h in handles:
                h.remove()
        # the same layer may be tapped twice (default taps of a shallow model), so read, then clear
        aux = torch.cat([self._taps[i] for i in self.aux_layers], dim=-1) if self.aux_layers else ids.new_empty(0)
        self._taps.clear()
        return out.logits, aux


# ---- cache surgery ---------------------------------------------------------------------------------------


def _gather_seq(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, S, D], index [B, R] -> x[b, :, index[b], :]."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _keep_cache(cache: DynamicCache, keep_from: int, index: Tensor) -> None:
    """Keep slots [0, keep_from) and, after them, the slots keep_from + index[b] of each row."""
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[:, :, :keep_from], _gather_seq(layer.keys, keep_from + index)], dim=2)
        layer.values = torch.cat([layer.values[:, :, :keep_from], _gather_seq(layer.values, keep_from + index)], dim=2)


def _select_rows_cache(cache: DynamicCache, rows: Tensor) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]


# ---- statistics ----------------------------------------------------------------------------------------


@dataclass
class SpecStats:
    """Per-cycle acceptance: τ = mean(accepted + 1); α_k = P(depth k accepted | depth k-1 accepted)."""

    steps: int
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted, one entry per row-cycle
    draft_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        return (sum(self.accepted) + len(self.accepted)) / max(1, len(self.accepted))

    @property
    def alpha(self) -> list[float]:
        out = []
        for k in range(1, self.steps + 1):
            tried = sum(n >= k - 1 for n in self.accepted)
            out.append(sum(n >= k for n in self.accepted) / tried if tried else float("nan"))
        return out

    @property
    def position_rate(self) -> list[float]:
        """Unconditional P(depth k accepted) per cycle: what vLLM's per-position acceptance counters give."""
        return [sum(n >= k for n in self.accepted) / max(1, self.cycles) for k in range(1, self.steps + 1)]

    def merge(self, other: SpecStats) -> None:
        self.accepted += other.accepted
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        self.commit_s += other.commit_s


@dataclass
class SpecOutput:
    tokens: list[list[int]]  # new tokens per prompt (eos included when hit)
    stats: SpecStats


# ---- the decoder -----------------------------------------------------------------------------------------


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


@dataclass
class _Tree:
    tokens: Tensor  # [B, T] target ids, index 0 = root (the last committed token)
    parent: Tensor  # [B, T] index of the parent in the tree (root: 0)
    depth: Tensor  # [B, T]
    anc: Tensor  # [B, T, T] ancestor-or-self
    q: Tensor | None = None  # chain sampling: [B, T-1, V] draft distribution of each node


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One sample per row of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return _sample(torch.softmax(logits.float() / temperature, dim=-1), generator)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        if not len(p):
            raise ValueError("empty prompt")
        ids[b, width - len(p) :] = torch.as_tensor(list(p))
        valid[b, width - len(p) :] = True
    return ids.to(device), valid.to(device)


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
        ids, valid = _left_pad(prompts, self.target.device)
        B, P = ids.shape
        pos = (valid.cumsum(1) - 1).clamp(min=0)
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)
        attend = (torch.ones(P, P, dtype=torch.bool, device=ids.device).tril() & valid[:, None, :]) | eye
        cache = DynamicCache()
        logits, aux = self.target.forward(ids, pos, cache, attend, pos, logits_to_keep=1)
        first = _pick(logits[:, -1], temperature, gen)
        d_ids = torch.cat([ids[:, 1:], first[:, None]], dim=1)
        pre, dkv = self.draft.step(d_ids, self.draft.project(aux.to(self.ddtype)), pos, None, attend[:, None])
        state = _State(
            rows=torch.arange(B, device=ids.device), cache=cache, dkv=dkv, valid=valid, pos=pos,
            length=valid.sum(1), last=first, hidden=pre[:, -1],
        )  # fmt: skip
        return state, first

    # -- drafting --------------------------------------------------------------------------------------

    def _draft(self, st: _State, spec: SpecConfig, temperature: float, gen) -> _Tree:
        """Expand `steps` levels (top-k frontier each), keep the draft_tokens-1 best nodes."""
        d = self.draft
        B, S0, k = st.valid.shape[0], st.valid.shape[1], spec.topk
        sampling_chain = temperature > 0 and k == 1
        dev = st.valid.device

        def propose(logits: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            """logits [B, F, Vd] -> (scores, draft ids) [B, F, k], draft probs if sampling a chain."""
            if sampling_chain:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tok = _sample(probs, gen)[..., None]
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
        all_score, all_tok = torch.cat(node_score, 1), torch.cat(node_tok, 1)
        all_parent, all_depth = torch.cat(node_parent, 1), torch.cat(node_depth, 1)
        # Best nodes first; a stable sort puts a parent (lower id, score >= its child's) before its
        # children on ties, so the selection is closed under ancestors. Then back to id order.
        n = spec.draft_tokens - 1
        sel = torch.sort(all_score, dim=1, descending=True, stable=True).indices[:, :n].sort(dim=1).values
        tokens = torch.cat([st.last[:, None], d.to_target_ids(all_tok.gather(1, sel))], dim=1)
        inv = torch.zeros(B, all_score.shape[1], dtype=torch.long, device=dev)
        inv.scatter_(1, sel, torch.arange(1, n + 1, device=dev).expand(B, n))
        par = all_parent.gather(1, sel)
        parent = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),
                            torch.where(par < 0, 0, inv.gather(1, par.clamp(min=0)))], dim=1)  # fmt: skip
        depth = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), all_depth.gather(1, sel)], dim=1)
        T = n + 1
        eyeT = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T)
        anc_t = eyeT
        for _ in range(levels):
            anc_t = eyeT | anc_t.gather(1, parent[:, :, None].expand(B, T, T))
        q = None
        if sampling_chain:
            q = torch.zeros(B, n, self.vocab, dtype=torch.float32, device=dev)
            q[:, :, self.draft_ids] = torch.stack(qs, 1)[:, :n]
        return _Tree(tokens=tokens, parent=parent, depth=depth, anc=anc_t, q=q)

    # -- verification ----------------------------------------------------------------------------------

    def _accept(self, tree: _Tree, logits: Tensor, temperature: float, gen) -> tuple[Tensor, Tensor, Tensor]:
        """(path [B, D+1] tree indices from the root, accepted count n [B], bonus token [B])."""
        B, T = tree.tokens.shape
        dev = tree.tokens.device
        if tree.q is not None:  # chain, rejection sampling against the draft's q
            p = torch.softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
            d = tree.tokens[:, 1:]
            pd = p[:, :-1].gather(-1, d[..., None])[..., 0]
            qd = tree.q.gather(-1, d[..., None])[..., 0]
            u = torch.rand(pd.shape, generator=gen, device=dev)
            ok = (u * qd < pd).long().cumprod(1)
            n = ok.sum(1)
            full = n == T - 1
            q_next = torch.cat([tree.q, torch.zeros_like(tree.q[:, :1])], 1).gather(
                1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]  # fmt: skip
            p_n = p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
            resid = (p_n - q_next).clamp(min=0)
            resid = torch.where(full[:, None] | (resid.sum(-1, keepdim=True) <= 0), p_n, resid)
            bonus = _sample(resid / resid.sum(-1, keepdim=True), gen)
            path = torch.arange(T, device=dev).expand(B, T)
            return path, n, bonus
        # greedy (y = argmax) or target-only tree sampling (one y ~ p per node, drawn up front)
        y = _pick(logits, temperature, gen)  # [B, T]
        cur = torch.zeros(B, dtype=torch.long, device=dev)
        n = torch.zeros(B, dtype=torch.long, device=dev)
        path = [cur]
        not_root = torch.arange(T, device=dev)[None] > 0
        for _ in range(int(tree.depth.max())):
            want = y.gather(1, cur[:, None])
            hit = (tree.parent == cur[:, None]) & (tree.tokens == want) & not_root
            has = hit.any(1)
            cur = torch.where(has, hit.long().argmax(1), cur)
            n = n + has.long()
            path.append(cur)
        return torch.stack(path, 1), n, y.gather(1, cur[:, None])[:, 0]

    # -- one cycle ------------------------------------------------------------------------------------

    def _verify(self, st: Any, tree: _Tree, temperature: float, gen) -> tuple[Tensor, ...]:
        """The target on the drafted tree after the committed tokens: (accepted path, accepted count n,
        bonus token, the tree's positions, the target's taps there)."""
        B, S0 = st.valid.shape
        T = tree.tokens.shape[1]
        q_pos = st.length[:, None] + tree.depth
        attend = torch.cat([st.valid[:, None].expand(B, T, S0), tree.anc], dim=2)
        logits, aux = self.target.forward(tree.tokens, q_pos, st.cache, attend, torch.cat([st.pos, q_pos], 1))
        path, n, bonus = self._accept(tree, logits, temperature, gen)
        return path, n, bonus, q_pos, aux

    @staticmethod
    def _record(stats: SpecStats, n: Tensor, t0: float, t1: float, t2: float) -> None:
        """Accepted counts and the draft / verify / commit times of a cycle (commit ends now)."""
        stats.accepted += n.tolist()
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.commit_s += time.perf_counter() - t2

    def _cycle(self, st: _State, spec: SpecConfig, temperature: float, gen, stats: SpecStats) -> list[Tensor]:
        """Draft, verify, commit; returns the new tokens of each row ([n_b + 1] each)."""
        t0 = time.perf_counter()
        tree = self._draft(st, spec, temperature, gen)
        t1 = time.perf_counter()
        path, n, bonus, q_pos, aux = self._verify(st, tree, temperature, gen)
        t2 = time.perf_counter()
        B, S0 = st.valid.shape
        R = int(n.max()) + 1
        path = torch.cat([path, path[:, -1:]], dim=1)  # room for the "next token" lookup below
        keep = path[:, :R]
        slot_ok = torch.arange(R, device=n.device)[None] <= n[:, None]
        path_tok = tree.tokens.gather(1, path[:, : R + 1])
        nxt = torch.where(torch.arange(R, device=n.device)[None] < n[:, None], path_tok[:, 1:], bonus[:, None])
        _keep_cache(st.cache, S0, keep)
        new_pos = q_pos.gather(1, keep)
        aux_path = aux.gather(1, keep[:, :, None].expand(-1, -1, aux.shape[-1]))
        causal = torch.ones(R, R, dtype=torch.bool, device=n.device).tril()
        eye = torch.eye(R, dtype=torch.bool, device=n.device)
        d_attend = torch.cat([st.valid[:, None].expand(B, R, S0), (causal & slot_ok[:, None, :]) | eye], dim=2)
        dkv = (st.dkv[0][:, :, :S0], st.dkv[1][:, :, :S0])  # drop the drafted entries
        hidden_in = self.draft.project(aux_path.to(self.ddtype))
        pre, st.dkv = self.draft.step(nxt, hidden_in, new_pos, dkv, d_attend[:, None])
        st.hidden = pre.gather(1, n[:, None, None].expand(-1, 1, pre.shape[-1]))[:, 0]
        st.valid = torch.cat([st.valid, slot_ok], dim=1)
        st.pos = torch.cat([st.pos, new_pos], dim=1)
        st.length = st.length + n + 1
        st.last = bonus
        self._record(stats, n, t0, t1, t2)
        return [nxt[b, : n[b] + 1] for b in range(B)]

    def _drop(self, st: _State, keep: Tensor) -> None:
        _select_rows_cache(st.cache, keep)
        st.dkv = (st.dkv[0][keep], st.dkv[1][keep])
        for name in ("rows", "valid", "pos", "length", "last", "hidden"):
            setattr(st, name, getattr(st, name)[keep])

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
        """New tokens for each prompt (all prompts decoded together as one batch)."""
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
                self._drop(st, torch.tensor([not x for x in done], device=st.valid.device).nonzero()[:, 0])
            new = self._cycle(st, spec, temperature, generator, stats)


@torch.no_grad()
def plain_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Token-by-token decoding with a DynamicCache: the baseline for speed and greedy equality.

    Prompts of one length use the model's own masks (its fastest path). Ragged prompts are left
    padded and get our 4D masks, in which every query sees itself: HF's padding masks leave pad
    queries with no key at all, which turns into NaN keys and values in the cache for some
    families (Gemma-2, eager attention) and poisons the whole row.
    """
    runner = TargetRunner(model, [])
    ids, valid = _left_pad(prompts, runner.device)
    B, P = ids.shape
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    padded = not bool(valid.all())
    cache = DynamicCache()
    if padded:
        attend = (torch.ones(P, P, dtype=torch.bool, device=ids.device).tril() & valid[:, None, :]) | torch.eye(
            P, dtype=torch.bool, device=ids.device
        )
        logits, _ = runner.forward(ids, pos, cache, attend, pos, logits_to_keep=1)
    else:
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    outs: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(B, device=ids.device)
    eos = set(eos_token_ids)
    while True:
        tok = _pick(logits[:, -1], temperature, generator)
        live = []
        for b, t in enumerate(tok.tolist()):
            row = outs[int(rows[b])]
            row.append(t)
            live.append(not (t in eos or len(row) >= max_new_tokens))
        if not any(live):
            return outs
        if not all(live):
            keep = torch.tensor(live, device=ids.device).nonzero()[:, 0]
            _select_rows_cache(cache, keep)
            rows, tok, valid, pos = rows[keep], tok[keep], valid[keep], pos[keep]
        if padded:
            q_pos = pos[:, -1:] + 1
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            pos = torch.cat([pos, q_pos], dim=1)
            logits, _ = runner.forward(tok[:, None], q_pos, cache, valid[:, None, :], pos)
        else:
            logits = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True).logits


# ---- evaluation over suites -----------------------------------------------------------------------------


def eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    return sorted(i for i in ids if i is not None)


def evaluate_suite(
    decoder: SpeculativeDecoder,
    tokenizer: Any,
    conversations: Sequence[Any],
    spec: SpecConfig,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
    baseline: bool = True,
    ngram: tuple[int, int] = NGRAM,
) -> dict[str, Any]:
    """Plain and speculative decoding of every turn, interleaved prompt by prompt in this process
    (so both see the same machine load); `baseline=False` skips plain decoding (no speedup then).
    At temperature 0 the result also holds n-gram prompt lookup's τ on the same prompts (`ngram` =
    its min and max n, drafting as many tokens as the draft's steps): the free baseline to beat.

    Multi-turn conversations ask turn i after the model's own (speculative) answers to turns < i.
    """
    from tqdm import tqdm

    from draftforge.eval.suites import render

    model = decoder.target.model
    eos = eos_ids(tokenizer, model)
    gen = torch.Generator(device=decoder.target.device).manual_seed(seed)
    stats = SpecStats(steps=spec.steps)
    lookup = LookupStats(spec.steps, *ngram) if temperature <= 0 else None
    plain_s = spec_s = 0.0
    plain_tok = spec_tok = prompts_done = matches = 0
    latencies: list[float] = []
    total = sum(len(c.turns) for c in conversations)
    bar = tqdm(total=total, desc=desc or spec.key, unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(conversations), spec.batch):
        group = list(conversations[start : start + spec.batch])
        answers: list[list[str]] = [[] for _ in group]
        for turn in range(max(len(c.turns) for c in group)):
            idx = [i for i, c in enumerate(group) if turn < len(c.turns)]
            prompts = [render(tokenizer, group[i], answers[i]) for i in idx]
            t0 = time.perf_counter()
            plain = plain_generate(model, prompts, max_new_tokens, temperature, eos, gen) if baseline else None
            t1 = time.perf_counter()
            out = decoder.generate(prompts, spec, max_new_tokens, temperature, eos, gen)
            t2 = time.perf_counter()
            plain_s, spec_s = plain_s + t1 - t0, spec_s + t2 - t1
            spec_tok += sum(map(len, out.tokens))
            if plain is not None:
                plain_tok += sum(map(len, plain))
                matches += sum(a == b for a, b in zip(plain, out.tokens, strict=True))
            latencies.append(t2 - t1)
            stats.merge(out.stats)
            for i, prompt, toks in zip(idx, prompts, out.tokens, strict=True):
                answers[i].append(tokenizer.decode(toks, skip_special_tokens=True))
                if lookup is not None:
                    lookup.add(prompt, toks)
            prompts_done += len(idx)
            bar.update(len(idx))
            post = {"tau": f"{stats.tau:.2f}"}
            if baseline:
                post["speedup"] = f"{(spec_tok / spec_s) / max(plain_tok / plain_s, 1e-9):.2f}"
            bar.set_postfix(post)
    bar.close()
    spec_tps = spec_tok / max(spec_s, 1e-9)
    plain_tps = plain_tok / max(plain_s, 1e-9) if baseline else None
    return {
        "batch": spec.batch,
        "steps": spec.steps,
        "topk": spec.topk,
        "draft_tokens": spec.draft_tokens,
        "num_prompts": prompts_done,
        "new_tokens": spec_tok,
        "cycles": stats.cycles,
        "accept_length": stats.tau if stats.cycles else 1.0,
        "acceptance": [None if math.isnan(a) else a for a in stats.alpha],
        "position_acceptance": stats.position_rate,
        "throughput": spec_tps,
        "latency": sum(latencies) / max(1, len(latencies)),  # seconds per generate call (one batch of prompts)
        "plain_throughput": plain_tps,
        "plain_latency": plain_s / max(1, len(latencies)) if baseline else None,
        "speedup": spec_tps / max(plain_tps, 1e-9) if plain_tps else None,
        "time_split": {"draft_s": stats.draft_s, "verify_s": stats.verify_s, "commit_s": stats.commit_s},
        "greedy_match": matches / max(1, prompts_done) if temperature <= 0 and baseline else None,
        "ngram": lookup.summary() if lookup is not None else None,
    }
