"""The EAGLE-3 draft (docs/design.md §4.2): frozen target embedding, fc over the three aux taps, one
Llama decoder layer whose attention reads concat(norm(embed), norm(hidden)), norm, lm_head over
the draft vocabulary. Parameter and buffer names are exactly what SGLang / vLLM load.

The layer is split into `qkv` and `finish` so the training-time-test unroll (train/ttt.py) can
put its own attention between them; `step` is the plain cached inference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftforge.draft.config import DraftModelConfig
from draftforge.draft.weight_cache import WeightCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Output in x's dtype (float32 statistics); under autograd only x and 1/rms are kept."""
        if _FUSED_RMS is None:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps).to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return _FUSED_RMS(x, [x.shape[-1]], self.weight, self.eps)[0]


_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


class _RMSNormFn(torch.autograd.Function):
    """One fused kernel forward; backward by hand (torch 2.13 has no CPU fused backward).
    The decomposed autograd path keeps five float32 copies of the input per norm."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        y, rstd = _FUSED_RMS(x, [x.shape[-1]], w, eps)
        ctx.save_for_backward(x, rstd, w)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, rstd, w = ctx.saved_tensors
        xh = x.to(rstd.dtype, copy=True).mul_(rstd)  # normalised input
        g = dy.to(rstd.dtype, copy=True)
        dw = (g * xh).flatten(0, -2).sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            g.mul_(w)
            s = torch.linalg.vecdot(g, xh).div_(x.shape[-1]).unsqueeze(-1)
            dx = xh.mul_(s).neg_().add_(g).mul_(rstd).to(x.dtype)
        return dx, dw, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward (not silu(gate) as well)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(dy * up, gate) if ctx.needs_input_grad[0] else None
        d_up = F.silu(gate).mul_(dy) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def rope_inv_freq(cfg: DraftModelConfig) -> tuple[Tensor, float]:
    """(inv_freq [D/2], cos/sin scale); scaled variants come from transformers' own functions."""
    d = cfg.head_dim
    if not cfg.rope_scaling:
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float(), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(cfg.rope_scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    shim = LlamaConfig(
        hidden_size=cfg.num_attention_heads * cfg.head_dim,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
    )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](shim, None)
    return inv_freq.float(), float(attention_scaling)


class Rotary:
    """cos / sin tables for given positions (no module buffers: the checkpoint holds none)."""

    def __init__(self, cfg: DraftModelConfig) -> None:
        self.inv_freq, self.scaling = rope_inv_freq(cfg)

    def __call__(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [..., T] -> cos, sin [..., T, D] in float32."""
        inv = self.inv_freq.to(position_ids.device)
        ang = position_ids.to(torch.float32)[..., None] * inv
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin [B or 1, T, D] (HF rotate_half convention)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = None
        if cfg.hidden_act != "silu":
            from transformers.activations import ACT2FN

            self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is None:
            return self.down_proj(_SiluMul.apply(gate, up) if torch.is_grad_enabled() else F.silu(gate) * up)
        return self.down_proj(self.act(gate) * up)



def _halves(w: Tensor, contiguous: bool = False) -> tuple[Tensor, Tensor]:
    """[out, 2h] -> its first and second h columns (views, or contiguous copies)."""
    h = w.shape[1] // 2
    first, second = w[:, :h], w[:, h:]
    return (first.contiguous(), second.contiguous()) if contiguous else (first, second)


_QKV_KEPT: WeightCache[tuple[Tensor, Tensor]] = WeightCache()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _qkv_weight(self) -> tuple[Tensor, Tensor]:
        """[q; k; v] projection split into the columns reading the embedding and the hidden. Without
        autograd (decoding) the two halves are kept, contiguous, until a weight changes: rebuilding
        them copied the whole projection twice per draft step."""
        a = self.self_attn
        weights = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        if torch.is_grad_enabled():
            return _halves(torch.cat(weights))
        return _QKV_KEPT.get(self, weights, lambda: _halves(torch.cat(weights), contiguous=True))

    def embed_part(self, emb: Tensor) -> Tensor:
        """input_layernorm(emb) through the embedding half of q/k/v: [B, T, (Hq+2Hkv)*D].

        Depends only on the token, not on the TTT step, so training computes it once per
        sequence and every step slices it (saves a sixth of the layer's matmuls)."""
        return F.linear(self.input_layernorm(emb), self._qkv_weight()[0])

    def qkv(
        self, emb: Tensor | None, hidden: Tensor, cos: Tensor, sin: Tensor, emb_part: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """emb, hidden [B, T, H] -> q [B, Hq, T, D], k / v [B, Hkv, T, D], RoPE applied.

        q/k/v of concat(input_layernorm(emb), hidden_norm(hidden)), as the embedding half
        (`embed_part`, or given precomputed) plus the hidden half.
        """
        a = self.self_attn
        if emb_part is None:
            emb_part = self.embed_part(emb)
        y = emb_part + F.linear(self.hidden_norm(hidden), self._qkv_weight()[1])
        q, k, v = y.split([a.n_heads * a.head_dim, a.n_kv * a.head_dim, a.n_kv * a.head_dim], -1)
        B, T = y.shape[:2]
        q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = k.view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
        v = v.view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, hidden: Tensor, attn: Tensor) -> Tensor:
        """Residual on the un-normed hidden, then the MLP block; returns the pre-norm output."""
        h = hidden + self.self_attn.o_proj(attn.transpose(1, 2).flatten(2))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(
        self,
        emb: Tensor,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = self.qkv(emb, hidden, cos, sin)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        T, S = q.shape[2], k.shape[2]
        causal = False
        if attn_mask is None and T > 1:
            if S == T:
                causal = True
            else:  # new tokens see all of the past and are causal among themselves
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, is_causal=causal, enable_gqa=True
        )
        return self.finish(hidden, out), (k, v)


def _per_column(scales: list[float], cfg: DraftModelConfig) -> Tensor:
    return torch.tensor(scales, dtype=torch.float32).repeat_interleave(cfg.target_hidden_size)


def fold_tap_scales(fc_weight: Tensor, cfg: DraftModelConfig) -> Tensor:
    """fc's weight with the tap scales multiplied in: a plain fc over the unscaled taps, as engines
    read it. Exact for power-of-two scales (what training measures)."""
    if cfg.tap_scales is None:
        return fc_weight
    return fc_weight * _per_column(cfg.tap_scales, cfg).to(fc_weight.device, fc_weight.dtype)


class TargetTiedDraft(nn.Module):
    """What every draft family shares with its target: the frozen copy of its input embedding
    (`embed_tokens`), the draft vocabulary as `d2t` / `t2d` buffers (docs/design.md §4.1), and the
    plain weight init. A subclass builds those three attributes."""

    embed_tokens: nn.Embedding
    d2t: Tensor
    t2d: Tensor

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    @torch.no_grad()
    def load_target_embedding(self, weight: Tensor) -> None:
        """Copy the target's input embedding (frozen, never exported)."""
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(f"target embedding {tuple(weight.shape)} != {tuple(self.embed_tokens.weight.shape)}")
        self.embed_tokens.weight.copy_(weight)
        self.embed_tokens.weight.requires_grad_(False)

    @torch.no_grad()
    def set_vocab_mapping(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install the draft vocabulary after checking d2t and t2d agree (d2t[i] = target id of i, minus i)."""
        d2t, t2d = d2t.to(torch.long).cpu(), t2d.to(torch.bool).cpu()
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not fit this draft")
        if not torch.equal(torch.nonzero(t2d).flatten(), d2t + torch.arange(len(d2t))):
            raise ValueError("d2t and t2d disagree: d2t[i] + i must list the t2d ids in order")
        self.d2t.copy_(d2t.to(self.d2t.device))
        self.t2d.copy_(t2d.to(self.t2d.device))

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]


class Eagle3Draft(TargetTiedDraft):
    def __init__(self, config: DraftModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = DecoderLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
        t2d[: c.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self.rotary = Rotary(c)
        self.register_buffer("tap_scale", None, persistent=False)  # its source of truth is config.tap_scales
        self.set_tap_scales(c.tap_scales)
        self.reset_parameters()

    @torch.no_grad()
    def head_from_target(self, head_weight: Tensor, norm_weight: Tensor) -> None:
        """lm_head = the target's output rows of the draft vocabulary, norm = the target's final norm:
        `logits(h)` is then the target's own output layer on h (its logit lens), so training starts
        from the target's map of hidden states to tokens instead of a random one."""
        rows = self.to_target_ids(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))
        if head_weight.shape[1] != self.lm_head.weight.shape[1] or norm_weight.shape != self.norm.weight.shape:
            raise ValueError(f"the target's head {tuple(head_weight.shape)} / norm {tuple(norm_weight.shape)} "
                             f"does not fit a draft of hidden size {self.config.hidden_size}")
        self.lm_head.weight.copy_(head_weight.index_select(0, rows.to(head_weight.device)))
        self.norm.weight.copy_(norm_weight)

    def set_tap_scales(self, scales: list[float] | None) -> None:
        """Scale each tap's block of fc's input (None: unscaled). Equalising the taps' magnitudes
        equalises how fast AdamW moves their fc columns; `fold_tap_scales` gives what an engine loads."""
        self.config.tap_scales = None if scales is None else [float(x) for x in scales]
        self.tap_scale = None if scales is None else _per_column(scales, self.config).to(self.fc.weight.device)


    # inference API -----------------------------------------------------------------------------

    def project(self, aux: Tensor) -> Tensor:
        """aux [..., 3*H_t] (three target taps) -> the step-0 hidden state [..., H]."""
        return self.fc(aux if self.tap_scale is None else aux * self.tap_scale.to(aux.dtype))

    def step(
        self,
        input_ids: Tensor,
        hidden: Tensor,
        position_ids: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One draft forward. input_ids [B, T]; hidden [B, T, H]: `project(aux)` or a previous
        pre-norm output; position_ids [B, T]; past_kv: (k, v) [B, Hkv, S, D] after RoPE;
        attn_mask [B, 1, T, S+T] bool (True = attend), default causal over the new tokens.
        Returns (pre-norm output [B, T, H], the new (k, v) including the past)."""
        emb = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary(position_ids)
        return self.midlayer(emb, hidden, cos, sin, past_kv, attn_mask)

    forward = step

    def logits(self, prenorm: Tensor) -> Tensor:
        """Draft-vocabulary logits of a pre-norm output."""
        return self.lm_head(self.norm(prenorm))

