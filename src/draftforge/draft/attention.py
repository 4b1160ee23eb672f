"""Training-time-test attention (docs/design.md §5.2).

The query of step k at index t attends, in one softmax, to the step-0 keys at indices <= t
(causal; sequences are right padded, so a valid query never sees a padded key) and to the keys
of steps 1..k at index t only (the diagonal). Three implementations behind `ttt_attention`:

- "reference": dense mask over the concatenation of all step keys, plain softmax. O(k L^2)
  memory; small and obviously right: the oracle for the others.
- "efficient": one fused causal kernel over the step-0 keys (torch's CPU flash kernel on CPU,
  a blockwise recomputing kernel elsewhere), whose log-sum-exp is merged with the k diagonal
  scores. Memory per extra step is O(L). Backward reuses the fused kernel's backward (see
  `_TTTAttention.backward` for why that is exact) plus the diagonal terms by hand.
- "blockwise": the efficient path with the device-generic blockwise causal kernel forced
  (what non-CPU devices use; selectable on CPU so it is tested).
- "flex": torch's flex attention over the concatenated step keys with a block mask (causal blocks
  for step 0, one diagonal block per query block for each later step), compiled on CUDA, where
  its fused kernel and backward run. On CPU it is flex's unfused eager implementation (dense
  scores): there only to check its forward against the reference; never the CPU default.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch
from torch import Tensor

BLOCK = 256  # query block of the blockwise causal kernel


def ttt_attention(
    q: Tensor,
    k_cache: list[Tensor],
    v_cache: list[Tensor],
    impl: str = "efficient",
    scale: float | None = None,
) -> Tensor:
    """q: [B, Hq, L, D] of step k; caches: the step 0..k keys / values, each [B, Hkv, L, D]."""
    if len(k_cache) != len(v_cache) or not k_cache:
        raise ValueError("k_cache and v_cache must be non-empty lists of the same length")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if impl == "reference":
        return reference_ttt_attention(q, k_cache, v_cache, scale)
    if impl in ("efficient", "blockwise"):
        blockwise = impl == "blockwise" or q.device.type != "cpu"
        return _TTTAttention.apply(scale, blockwise, q, *k_cache, *v_cache)
    if impl == "flex":
        return flex_ttt_attention(q, k_cache, v_cache, scale)
    raise ValueError(f"unknown TTT attention impl {impl!r} (reference | efficient | blockwise | flex)")


def ttt_mask(length: int, steps: int, device: torch.device | None = None) -> Tensor:
    """[L, steps*L] bool, True = attend: causal block for step 0, then one diagonal per step."""
    i = torch.arange(length, device=device)
    causal = i[:, None] >= i[None, :]
    diag = i[:, None] == i[None, :]
    return torch.cat([causal] + [diag] * (steps - 1), dim=1)


def reference_ttt_attention(q: Tensor, k_cache: list[Tensor], v_cache: list[Tensor], scale: float) -> Tensor:
    groups = q.shape[1] // k_cache[0].shape[1]
    k = torch.cat(k_cache, dim=2).repeat_interleave(groups, dim=1)
    v = torch.cat(v_cache, dim=2).repeat_interleave(groups, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~ttt_mask(q.shape[2], len(k_cache), q.device), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=_acc(q.dtype)).to(v.dtype)
    return p @ v


def flex_ttt_attention(q: Tensor, k_cache: list[Tensor], v_cache: list[Tensor], scale: float) -> Tensor:
    """The TTT attention as one flex attention call over the keys of all steps, [B, Hkv, steps*L, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    length, steps = q.shape[2], len(k_cache)
    mask = _flex_block_mask(length, steps, q.device)
    k, v = torch.cat(k_cache, dim=2), torch.cat(v_cache, dim=2)
    attend = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # shapes go dynamic after the first new length


@lru_cache(maxsize=8)
def _flex_block_mask(length: int, steps: int, device: torch.device):
    """`ttt_mask` as a flex BlockMask (key index s*L + j: step s, position j); one per (L, steps, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        step, j = kv_idx // length, kv_idx % length
        return ((step == 0) & (j <= q_idx)) | ((step > 0) & (j == q_idx))

    return create_block_mask(mask_mod, None, None, length, steps * length, device=device)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TTTAttention(torch.autograd.Function):
    """Causal flash attention over step 0, merged by log-sum-exp with the diagonal keys.

    Args after (scale, blockwise): q, k_0..k_n, v_0..v_n (n = number of extra steps).
    """

    @staticmethod
    def forward(ctx, scale: float, blockwise: bool, q: Tensor, *kv: Tensor) -> Tensor:  # type: ignore[override]
        n = len(kv) // 2 - 1
        k0, ks, v0, vs = kv[0], kv[1 : n + 1], kv[n + 1], kv[n + 2 :]
        if blockwise:
            q, k0, v0 = q.contiguous(), k0.contiguous(), v0.contiguous()
        o_c, lse_c = _causal_forward(q, k0, v0, scale, blockwise)
        ctx.scale, ctx.blockwise, ctx.n = scale, blockwise, n
        if n == 0:
            ctx.save_for_backward(q, k0, v0, o_c, lse_c)
            return o_c
        acc = _acc(q.dtype)
        qg = _group(q, k0.shape[1]).to(acc)  # [B, Hkv, G, L, D]
        s = torch.stack([(qg * k.to(acc).unsqueeze(2)).sum(-1) * scale for k in ks])  # [n, B, Hkv, G, L]
        lse_cg = _group(lse_c, k0.shape[1]).to(acc)
        lse = torch.logsumexp(torch.cat([lse_cg.unsqueeze(0), s]), dim=0)
        a = (lse_cg - lse).exp()
        b = (s - lse).exp()
        # merged output in o_c's memory layout ([B, L, H, D] when q is a head-transposed view)
        # (operands upcast first: mixed-dtype in-place ops take a slow scalar path on CPU)
        outg = _group(o_c, k0.shape[1]).to(acc, copy=True).mul_(a.unsqueeze(-1))
        for j, v in enumerate(vs):
            outg.addcmul_(b[j].unsqueeze(-1), v.to(acc).unsqueeze(2))
        out = outg.flatten(1, 2).to(q.dtype)
        ctx.save_for_backward(q, k0, v0, out, lse_c, a, b, *ks, *vs)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):  # type: ignore[override]
        """Gradient of the merged softmax.

        Causal keys: calling the fused backward with grad_out = a*dO and out = the MERGED output
        makes its row term D_i = a_i (dO_i . out_i), so its dS_ij = a_i P_ij (dO_i . v_j -
        dO_i . out_i): exactly the merged-softmax gradient, since a_i P_ij is the merged
        probability of causal key j. Diagonal key j: ds_j = b_j (dO . v_j - dO . out).
        """
        n, scale = ctx.n, ctx.scale
        if ctx.blockwise:
            d_out = d_out.contiguous()
        if n == 0:
            q, k0, v0, out, lse_c = ctx.saved_tensors
            dq, dk0, dv0 = _causal_backward(d_out, q, k0, v0, out, lse_c, scale, ctx.blockwise)
            return None, None, dq, dk0, dv0
        q, k0, v0, out, lse_c, a, b, *kvs = ctx.saved_tensors
        ks, vs = kvs[:n], kvs[n:]
        hkv, acc = k0.shape[1], a.dtype
        dog = _group(d_out, hkv).to(acc)
        g_c = (dog * a.unsqueeze(-1)).flatten(1, 2).to(q.dtype)
        dq, dk0, dv0 = _causal_backward(g_c, q, k0, v0, out, lse_c, scale, ctx.blockwise)
        qg = _group(q, hkv).to(acc)
        row = (dog * _group(out, hkv).to(acc)).sum(-1)  # D_i = dO_i . out_i
        dqg = _group(dq, hkv).to(acc)
        dks, dvs = [], []
        for j in range(n):
            kj, vj = ks[j].to(acc).unsqueeze(2), vs[j].to(acc).unsqueeze(2)
            bj = b[j]
            dvs.append((bj.unsqueeze(-1) * dog).sum(2).to(vs[j].dtype))
            ds = bj * ((dog * vj).sum(-1) - row)
            dqg += (scale * ds).unsqueeze(-1) * kj
            dks.append((scale * (ds.unsqueeze(-1) * qg).sum(2)).to(ks[j].dtype))
        return None, None, dqg.flatten(1, 2).to(q.dtype), dk0, *dks, dv0, *dvs


def _group(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, G, ...]: query head h uses kv head h // G (HF repeat_kv)."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _causal_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, blockwise: bool) -> tuple[Tensor, Tensor]:
    """(out [B,Hq,L,D], lse [B,Hq,L]) of causal attention, GQA."""
    if not blockwise:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return _blockwise_forward(q, k, v, scale)


def _causal_backward(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, blockwise: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if not blockwise:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out, q, k, v, out, lse, 0.0, True, scale=scale
        )
    return _blockwise_backward(d_out, q, k, v, out, lse, scale)


def _blockwise_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention a query block at a time: scores [blk, L] at most, never [L, L]."""
    acc, hkv = _acc(q.dtype), k.shape[1]
    qg = _group(q, hkv)
    L = q.shape[2]
    out = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:-1], dtype=acc, device=q.device)
    for i0 in range(0, L, BLOCK):
        i1 = min(i0 + BLOCK, L)
        s = _block_scores(qg, k, i0, i1, scale)
        m = torch.logsumexp(s, dim=-1)
        lse[..., i0:i1] = m
        p = (s - m.unsqueeze(-1)).exp().to(v.dtype)
        out[..., i0:i1, :] = p @ v[:, :, None, :i1]
    return out.flatten(1, 2), lse.flatten(1, 2)


def _blockwise_backward(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc, hkv = _acc(q.dtype), k.shape[1]
    qg, dog, outg, lseg = (_group(x, hkv) for x in (q, d_out, out, lse))
    L = q.shape[2]
    dq = torch.empty_like(qg)
    dk = torch.zeros(qg.shape, dtype=acc, device=q.device)
    dv = torch.zeros(qg.shape, dtype=acc, device=q.device)
    row = (dog.to(acc) * outg.to(acc)).sum(-1)
    for i0 in range(0, L, BLOCK):
        i1 = min(i0 + BLOCK, L)
        p = (_block_scores(qg, k, i0, i1, scale) - lseg[..., i0:i1, None].to(acc)).exp()
        g = dog[..., i0:i1, :].to(acc)
        dp = g @ v[:, :, None, :i1].to(acc).transpose(-1, -2)
        ds = p * (dp - row[..., i0:i1, None]) * scale
        dq[..., i0:i1, :] = (ds @ k[:, :, None, :i1].to(acc)).to(q.dtype)
        dk[..., :i1, :] += ds.transpose(-1, -2) @ qg[..., i0:i1, :].to(acc)
        dv[..., :i1, :] += p.transpose(-1, -2) @ g
    return dq.flatten(1, 2), dk.sum(2).to(k.dtype), dv.sum(2).to(v.dtype)


def _block_scores(qg: Tensor, k: Tensor, i0: int, i1: int, scale: float) -> Tensor:
    acc = _acc(qg.dtype)
    s = (qg[..., i0:i1, :] @ k[:, :, None, :i1].transpose(-1, -2)).to(acc) * scale
    rows = torch.arange(i0, i1, device=qg.device)[:, None]
    cols = torch.arange(i1, device=qg.device)[None, :]
    return s.masked_fill(cols > rows, float("-inf"))
