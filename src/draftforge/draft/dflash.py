"""The DFlash block draft: a few Qwen3-style layers that fill a block of mask tokens in one forward.

Context: the target's hidden states at the tapped layers, concatenated, projected by `fc` and
normed by `hidden_norm`, give every layer its context keys / values (through that layer's own
k_proj / k_norm / v_proj, RoPE at the context positions). Query: the block
[last accepted token, MASK x (block_size - 1)] embedded with the target's embedding; each block
position attends to the context before the block and bidirectionally to its whole block. The
output of block position j (j >= 1) is the draft of the token at the block's start + j, read
through `norm` and the target's lm_head (or an own reduced-vocabulary lm_head + d2t).

Parameter names are what vLLM's `qwen3_dflash` loader reads (`fc`, `hidden_norm`, `norm`,
`layers.{i}.self_attn.{q,k,v,o}_proj / q_norm / k_norm`, `layers.{i}.mlp.*`, the two layer norms,
optionally `lm_head` and `d2t`). The embedding (and a shared lm_head) are the target's, never saved.

One code path serves training and decoding: `blocks` takes N blocks per row, each with its own
visibility of the context (training: N anchors per sequence; decoding: one block per row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftforge.draft.dflash_config import DFlashConfig
from draftforge.draft.model import MLP, RMSNorm, Rotary, TargetTiedDraft, apply_rope


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig, shared_k_norm: RMSNorm | None = None) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if shared_k_norm is None:
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:  # layer 0's module, not registered here: one parameter, saved once (as layer 0's)
            object.__setattr__(self, "k_norm", shared_k_norm)

    def _heads(self, x: Tensor, n: int, norm: RMSNorm | None = None) -> Tensor:
        """[B, T, n*D] -> [B, n, T, D], per-head RMSNorm first when given."""
        x = x.view(*x.shape[:-1], n, self.head_dim)
        return (norm(x) if norm is not None else x).transpose(1, 2)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (k_norm, RoPE) and values [B, Hkv, T, D] of x [B, T, H]."""
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv, self.k_norm), cos, sin)
        return k, self._heads(self.v_proj(x), self.n_kv)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx_kv: tuple[Tensor, Tensor], ctx_mask: Tensor,
                block: int) -> Tensor:
        """x [B, N*T, H] (N blocks of T positions), cos/sin [B, N*T, D], ctx_kv [B, Hkv, S, D] each,
        ctx_mask [B, N, S] bool (True = the block sees that context slot)."""
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads, self.q_norm), cos, sin)
        k, v = self.kv(x, cos, sin)
        out = block_attention(q, *ctx_kv, k, v, ctx_mask, block)
        return self.o_proj(out.transpose(1, 2).flatten(2))


def block_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_blk: Tensor, v_blk: Tensor, ctx_mask: Tensor,
                    block: int) -> Tensor:
    """One softmax per query over [its block's visible context | its whole block].

    q [B, Hq, N*T, D]; k_ctx / v_ctx [B, Hkv, S, D]; k_blk / v_blk [B, Hkv, N*T, D]; ctx_mask
    [B, N, S]; T = block. Scores against the context are [B, Hq, N*T, S]: dense per block, which
    is what the CPU budget here needs (sequences of a few thousand tokens); blocks never score each
    other. Softmax in float32 at least; output [B, Hq, N*T, D] in q's dtype.
    """
    B, Hq, Q, D = q.shape
    hkv, N = k_ctx.shape[1], Q // block
    g = Hq // hkv
    scale = 1.0 / math.sqrt(D)
    qg = q.reshape(B, hkv, g, Q, D)
    acc = torch.promote_types(q.dtype, torch.float32)
    s_ctx = torch.einsum("bhgqd,bhsd->bhgqs", qg, k_ctx.to(q.dtype)).to(acc) * scale
    see = ctx_mask.repeat_interleave(block, dim=1)[:, None, None]  # [B, 1, 1, Q, S]
    s_ctx = s_ctx.masked_fill(~see, float("-inf"))
    qb = qg.reshape(B, hkv, g, N, block, D)
    kb = k_blk.to(q.dtype).reshape(B, hkv, 1, N, block, D)
    s_blk = (qb @ kb.transpose(-1, -2)).to(acc).mul_(scale).reshape(B, hkv, g, Q, block)
    p = torch.softmax(torch.cat([s_ctx, s_blk], dim=-1), dim=-1).to(q.dtype)
    p_ctx, p_blk = p.split([k_ctx.shape[2], block], dim=-1)
    out = p_ctx @ v_ctx.to(q.dtype)[:, :, None]
    vb = v_blk.to(q.dtype).reshape(B, hkv, 1, N, block, D)
    out = out + (p_blk.reshape(B, hkv, g, N, block, block) @ vb).reshape(B, hkv, g, Q, D)
    return out.reshape(B, Hq, Q, D)


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig, shared_k_norm: RMSNorm | None = None) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(cfg, shared_k_norm)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, ctx_kv: tuple[Tensor, Tensor], ctx_mask: Tensor,
                block: int) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_kv, ctx_mask, block)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(TargetTiedDraft):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(len(c.aux_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        first = DFlashLayer(c)
        shared = first.self_attn.k_norm if c.shared_k_norm else None
        self.layers = nn.ModuleList([first] + [DFlashLayer(c, shared) for _ in range(c.num_layers - 1)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # own head only for a reduced vocabulary; otherwise the target's (`load_target_head`)
        self.lm_head = None if c.full_vocab else nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.shared_head: nn.Linear | None = None  # the target's, by reference; not registered: never saved
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
        t2d[: c.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self.rotary = Rotary(c)  # type: ignore[arg-type]  # reads the same fields as an EAGLE-3 config
        self.reset_parameters()

    def load_target_head(self, weight: Tensor) -> None:
        """Use the target's lm_head [V, H] (by reference) when the draft has no head of its own."""
        if self.lm_head is None and tuple(weight.shape) != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"target lm_head {tuple(weight.shape)} does not fit this draft")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        head.weight = nn.Parameter(weight.detach(), requires_grad=False)  # the same storage
        # a module, so decoding packs it like the draft's own linears (decode/dflash.py); set past
        # nn.Module's registration, as a shared k_norm is: no parameter of the draft, never saved or moved
        object.__setattr__(self, "shared_head", head)

    @torch.no_grad()
    def head_from_target(self, head_weight: Tensor, norm_weight: Tensor) -> None:
        """norm = the target's final norm and an own lm_head = the target's rows of the draft vocabulary:
        the draft's output layer starts as the target's (its logit lens) instead of a random one."""
        if norm_weight.shape != self.norm.weight.shape:
            raise ValueError(f"the target's final norm {tuple(norm_weight.shape)} does not fit this draft")
        self.norm.weight.copy_(norm_weight)
        if self.lm_head is not None:
            rows = self.to_target_ids(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))
            self.lm_head.weight.copy_(head_weight.index_select(0, rows.to(head_weight.device)))

    def head(self) -> nn.Linear:
        """The output layer [Dv, H]: the own reduced-vocabulary head, or the target's."""
        if self.lm_head is not None:
            return self.lm_head
        if self.shared_head is None:
            raise RuntimeError("full-vocabulary DFlash draft without the target's lm_head (load_target_head)")
        return self.shared_head

    def head_weight(self) -> Tensor:
        """[Dv, H]: the own reduced-vocabulary head's weight, or the target's."""
        return self.head().weight

    # ---- forward pieces --------------------------------------------------------------------------

    def context(self, aux: Tensor) -> Tensor:
        """Tapped target states [B, S, taps*H_t] -> normed context [B, S, H] (one per target position)."""
        return self.hidden_norm(self.fc(aux))

    def context_kv(self, ctx: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's context keys (RoPE at `positions` [B or 1, S]) and values, [B, Hkv, S, D]."""
        cos, sin = self.rotary(positions)
        return [layer.self_attn.kv(ctx, cos, sin) for layer in self.layers]

    def blocks(self, ids: Tensor, positions: Tensor, ctx_kv: list[tuple[Tensor, Tensor]], ctx_mask: Tensor) -> Tensor:
        """ids / positions [B, N, T] (N blocks of T = block_size tokens), ctx_kv from `context_kv`,
        ctx_mask [B, N, S] -> pre-norm outputs [B, N, T, H]."""
        B, N, T = ids.shape
        ctx_dtype = ctx_kv[0][0].dtype
        h = self.embed_tokens(ids.flatten(1)).to(ctx_dtype)
        cos, sin = self.rotary(positions.flatten(1))
        for layer, kv in zip(self.layers, ctx_kv, strict=True):
            h = layer(h, cos, sin, kv, ctx_mask, T)
        return h.view(B, N, T, -1)

    def logits(self, prenorm: Tensor) -> Tensor:
        """Draft-vocabulary logits of pre-norm outputs: through the head module in its own dtype (on a
        packed weight while decoding in float32), else on the head's weight cast to the outputs' dtype."""
        x, head = self.norm(prenorm), self.head()
        return head(x) if head.weight.dtype == x.dtype else F.linear(x, head.weight.to(x.dtype))

    def block_ids(self, first: Tensor) -> Tensor:
        """[..., block_size] block inputs: the given first tokens, then mask tokens."""
        out = torch.full((*first.shape, self.config.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=first.device)
        out[..., 0] = first
        return out
