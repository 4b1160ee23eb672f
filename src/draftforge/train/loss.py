"""TTT loss pieces that never hold full-vocabulary or [rows, draft_vocab] logits for long
sequences (docs/design.md §2.3, §5.3).

- `teacher_targets`: the target's distribution restricted to the draft vocabulary (its logits,
  kept in the compute dtype) and whether the full-vocabulary argmax is a draft token, found by
  streaming the non-draft rows of the target lm_head in chunks (no grad).
- `fused_linear_soft_ce`: draft lm_head + soft cross-entropy against the teacher, chunk by chunk;
  the gradients w.r.t. the hidden rows and the lm_head weight are computed in the forward pass
  (Liger-style), so only [rows, H] and [Dv, H] survive to the backward.
- `ttt_objective`, `ttt_metrics`: the weighted sum over steps, and acc_k / loss_k / simulated tau.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype in effect: autocast's when enabled on x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


@dataclass
class TeacherTargets:
    probs: Tensor  # [N, Dv] target softmax over the draft vocabulary (compute dtype)
    argmax: Tensor  # [N] long, draft id of the teacher's top token within the draft vocabulary
    in_draft: Tensor  # [N] bool, the full-vocabulary argmax is a draft token


TEACHER_ROW_CHUNK, TEACHER_VOCAB_CHUNK = 1024, 8192  # teacher_targets' [rows, vocabulary] logits block


def loss_chunks(draft_vocab: int) -> tuple[int, int]:
    """fused_linear_soft_ce's default rows per matmul (a [chunk, Dv] block of about 2^24 elements)
    and rows per float32 step (about 2^19 elements: cache-sized)."""
    return max(16, (1 << 24) // draft_vocab), max(4, (1 << 19) // draft_vocab)


@torch.no_grad()
def teacher_targets(
    final_hidden: Tensor,
    lm_head_weight: Tensor,
    t2d: Tensor,
    row_chunk: int = TEACHER_ROW_CHUNK,
    vocab_chunk: int = TEACHER_VOCAB_CHUNK,
    logit_softcap: float | None = None,
) -> TeacherTargets:
    """final_hidden [N, Ht] (after the target's final norm), lm_head_weight [V, Ht], t2d [V] bool.
    `logit_softcap` (Gemma-2 style tanh capping) shapes the teacher's probabilities; it is monotone,
    so which token is the argmax is decided on the raw logits.

    Probabilities are computed once per index (every TTT step reuses them) and stored in the
    compute dtype; logits only ever exist for [row_chunk, Dv] or [row_chunk, vocab_chunk]. The
    non-draft rows only need their maximum (amax is ~10x cheaper than argmax on CPU); the rare
    exact ties with the draft maximum are resolved on the full row, as argmax would.
    """
    dt = compute_dtype(final_hidden)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    dev = final_hidden.device
    n = final_hidden.shape[0]
    with torch.autocast(dev.type, enabled=False):
        draft_ids, w_draft, other_ids, w_other = _split_head(lm_head_weight, t2d, dt, vocab_chunk)
        dv = w_draft.shape[0]
        probs = torch.empty(n, dv, dtype=dt, device=dev)
        argmax = torch.empty(n, dtype=torch.long, device=dev)
        in_draft = torch.empty(n, dtype=torch.bool, device=dev)
        rc = max(1, min(row_chunk, n))
        z_lo = torch.empty(rc, dv, dtype=dt, device=dev)
        z_buf = torch.empty(rc, dv, dtype=acc, device=dev) if dt != acc else z_lo
        p_buf = torch.empty(rc, dv, dtype=acc, device=dev)
        o_lo = torch.empty(rc, vocab_chunk, dtype=dt, device=dev)
        for r in range(0, n, row_chunk):
            c = min(row_chunk, n - r)
            x = final_hidden[r : r + c].to(dt)
            z = z_buf[:c].copy_(torch.mm(x, w_draft.T, out=z_lo[:c]))
            d_max, d_arg = z.max(-1)
            argmax[r : r + c] = d_arg
            if logit_softcap:
                z = torch.tanh(z / logit_softcap) * logit_softcap
            if dt == acc:
                torch._softmax(z, -1, False, out=probs[r : r + c])
            else:
                probs[r : r + c] = torch._softmax(z, -1, False, out=p_buf[:c])
            o_max = torch.full((c,), float("-inf"), dtype=dt, device=dev)
            for w in w_other:
                o_max = torch.maximum(o_max, torch.mm(x, w.T, out=o_lo[:c, : w.shape[0]]).amax(-1))
            d_max = d_max.to(dt)
            inside = d_max > o_max
            ties = torch.nonzero(d_max == o_max).flatten()
            if len(ties):  # exact ties (common in bf16): the lowest id wins, as in argmax
                xt, mt = x.index_select(0, ties), o_max[ties, None]
                o_tid = torch.full_like(ties, len(t2d))
                off = 0
                for w in w_other:
                    eq = (xt @ w.T) == mt
                    first = other_ids[off + eq.to(torch.uint8).argmax(-1)]
                    o_tid = torch.minimum(o_tid, torch.where(eq.any(-1), first, len(t2d)))
                    off += w.shape[0]
                inside[ties] = draft_ids[d_arg[ties]] < o_tid
            in_draft[r : r + c] = inside
    return TeacherTargets(probs=probs, argmax=argmax, in_draft=in_draft)


_HEAD_CACHE: dict[str, tuple] = {}


def _split_head(
    weight: Tensor, t2d: Tensor, dt: torch.dtype, vocab_chunk: int
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(draft ids, their rows, other ids, blocks of vocab_chunk other rows) of the target head
    in dtype dt.

    The head is frozen and the same every step, so the last split is kept (about 100 ms of
    gather + cast per call otherwise), keyed by the very tensors (weak references) and their
    version counters so an in-place update or a new tensor is never served stale.
    """
    key = (dt, vocab_chunk, weight._version, t2d._version, weight.shape, t2d.shape)
    hit = _HEAD_CACHE.get("head")
    if hit is not None and hit[0]() is weight and hit[1]() is t2d and hit[2] == key:
        return hit[3]
    t2d_w = t2d.to(weight.device)
    draft_ids = torch.nonzero(t2d_w).flatten()
    other = torch.nonzero(~t2d_w).flatten()
    w_draft = weight.index_select(0, draft_ids).to(dt)
    w_other = [weight.index_select(0, other[i : i + vocab_chunk]).to(dt) for i in range(0, len(other), vocab_chunk)]
    split = (draft_ids, w_draft, other, w_other)
    _HEAD_CACHE["head"] = (weakref.ref(weight), weakref.ref(t2d), key, split)
    return split


class _FusedLinearSoftCE(torch.autograd.Function):
    """Loss and both gradients in one chunked pass; backward only scales them.

    Matmuls run on `chunk` rows at a time in the compute dtype; the float32 softmax arithmetic
    runs on `sub` rows at a time in a small workspace that stays in cache, so only the low
    precision logits / teacher rows / gradient rows travel through memory. All buffers are
    allocated once per call: fresh multi-megabyte tensors per chunk cost more in page faults
    than the arithmetic on them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: Tensor,
        weight: Tensor,
        t_probs: Tensor,
        t_rows: Tensor,
        t_argmax: Tensor,
        dt: torch.dtype,
        chunk: int,
        sub: int,
        weight_lo: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_g = need_h or need_w
        ctx.w_dtype = weight.dtype
        n, dev = h.shape[0], h.device
        dv, hd = weight.shape
        acc = torch.float64 if dt == torch.float64 else torch.float32
        w = weight.to(dt) if weight_lo is None else weight_lo
        loss = torch.zeros((), dtype=acc, device=dev)
        hits = torch.empty(n, dtype=torch.bool, device=dev)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        if need_w:  # written by the first chunk; zeros only when there is none
            grad_w = torch.empty(weight.shape, dtype=acc, device=dev) if n else torch.zeros_like(weight, dtype=acc)
        rc, rs = max(1, min(chunk, n)), max(1, min(sub, chunk, n))

        def buf(rows: int, dtype: torch.dtype, cols: int = dv) -> Tensor:
            return torch.empty(rows, cols, dtype=dtype, device=dev)

        low = dt != acc  # low-precision matmuls: float32 copies of each sub-block
        z_lo = buf(rc, dt)  # logits of a chunk, compute dtype
        g_lo = buf(rc, dt) if need_g else None  # d loss / d logits of a chunk
        z = buf(rs, acc) if low else None  # the cache-sized float32 workspace
        q = buf(rs, acc) if low or not need_g else None  # (else softmax is written into g_lo)
        p = buf(rs, acc)
        p_lo = buf(rs, t_probs.dtype) if t_probs.dtype != acc else None
        gw_lo = buf(dv, dt, hd) if need_w and dt != acc else None
        gw_hi = buf(dv, acc, hd) if gw_lo is not None and n > chunk else None
        with torch.autocast(dev.type, enabled=False):
            for i in range(0, n, chunk):
                c = min(chunk, n - i)
                hc = h[i : i + c].to(dt)
                torch.mm(hc, w.T, out=z_lo[:c])
                for j in range(0, c, sub):
                    e = min(sub, c - j)
                    rows = t_rows[i + j : i + j + e]
                    pe = p[:e]
                    ze = z[:e].copy_(z_lo[j : j + e]) if low else z_lo[j : j + e]
                    qe = q[:e] if low or not need_g else g_lo[j : j + e]
                    m = ze.amax(-1)
                    # top-1 agreement: the teacher's top token is a maximum of the draft logits
                    torch.eq(ze.gather(1, t_argmax.index_select(0, rows)[:, None]).squeeze(1), m,
                             out=hits[i + j : i + j + e])
                    if p_lo is not None:
                        pe.copy_(torch.index_select(t_probs, 0, rows, out=p_lo[:e]))
                    else:
                        torch.index_select(t_probs, 0, rows, out=pe)
                    p_sum = pe.sum(-1)
                    torch._softmax(ze, -1, False, out=qe)
                    lse = m - qe.amax(-1).log()  # the max of a softmax is exp(max - lse)
                    # sum_j p_j (lse - z_j): exact even when stored probabilities do not sum to 1
                    loss += torch.dot(lse, p_sum) - torch.dot(pe.flatten(), ze.flatten())
                    if need_g:
                        qe.mul_(p_sum[:, None]).sub_(pe)  # d loss / d logits
                        if low:
                            g_lo[j : j + e].copy_(qe)
                if not need_g:
                    continue
                g = g_lo[:c]
                if need_h and grad_h.dtype == dt:
                    torch.mm(g, w, out=grad_h[i : i + c])
                elif need_h:
                    grad_h[i : i + c] = g @ w
                if need_w and gw_lo is None:
                    grad_w.addmm_(g.T, hc, beta=1.0 if i else 0.0)
                elif need_w:  # low-precision product, accumulated in float32 (never mixed-dtype add_:
                    torch.mm(g.T, hc, out=gw_lo)  # that is a slow scalar path on CPU)
                    if i:
                        grad_w.add_(gw_hi.copy_(gw_lo))
                    else:
                        grad_w.copy_(gw_lo)
        # intermediates, not inputs or outputs: kept on ctx and scaled in place in backward
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, d_loss: Tensor, _d_hits: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # a second backward through this graph is not supported
        gh = grad_h.mul_(d_loss.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(d_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def fused_linear_soft_ce(
    hidden: Tensor,
    weight: Tensor,
    teacher_probs: Tensor,
    teacher_rows: Tensor,
    teacher_argmax: Tensor,
    chunk: int | None = None,
    sub: int | None = None,
    weight_lo: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum over rows of CE(teacher_probs[teacher_rows], log_softmax(hidden @ weight.T)).

    hidden [n, H] (already normed), weight [Dv, H], teacher_probs [N, Dv], teacher_rows [n] long
    (row of each hidden row in teacher_probs), teacher_argmax [N]. Returns (loss_sum float32
    (float64 for a float64 model), hits bool [n]: the rows whose teacher top token is a top draft
    logit; ties, which only low precision makes likely, count as agreement). Matmuls in the
    autocast dtype when autocast is on; softmax and accumulation in float32. `chunk` rows per
    matmul (default: a [chunk, Dv] block of about 2^24 elements), `sub` rows per float32 step
    (default about 2^19 elements: cache-sized). `weight_lo`: weight already converted to the compute
    dtype, detached (one conversion shared by the TTT steps instead of one per call); the gradient
    still goes to `weight`, in its own dtype.
    """
    dt = compute_dtype(hidden)
    if weight_lo is not None and (weight_lo.dtype != dt or weight_lo.shape != weight.shape):
        raise ValueError(f"weight_lo must be weight in the compute dtype {dt}, got {weight_lo.dtype} "
                         f"{tuple(weight_lo.shape)}")
    default_chunk, default_sub = loss_chunks(weight.shape[0])
    chunk, sub = chunk or default_chunk, sub or default_sub
    return _FusedLinearSoftCE.apply(hidden, weight, teacher_probs, teacher_rows, teacher_argmax, dt, chunk, sub,
                                    weight_lo)


def ttt_objective(out, counts: Tensor | None = None, decay: float = 0.8) -> Tensor:
    """sum_k decay^k * loss_sum_k / max(count_k, 1). Pass `counts` all-reduced over data-parallel
    ranks (and accumulation micro-batches) to get the global mean per step."""
    counts = out.count if counts is None else counts
    loss_sum = out.loss_sum
    w = step_weights(len(loss_sum), decay, loss_sum) / counts.to(loss_sum.device, loss_sum.dtype).clamp(min=1)
    return (loss_sum * w).sum()


def step_weights(steps: int, decay: float, like: Tensor) -> Tensor:
    """decay^k for the TTT steps k = 0..steps-1 (the objective's weight of each step's mean loss)."""
    return decay ** torch.arange(steps, device=like.device, dtype=like.dtype)


def ttt_metrics(
    correct: Tensor,
    count: Tensor,
    loss_sum: Tensor | None = None,
    chain: Tensor | None = None,
    chain_base: Tensor | None = None,
) -> dict[str, float]:
    """acc_k, loss_k (when loss sums are given), simulated acceptance 1 + sum_k prod_{j<=k} acc_j,
    and with chain counts the conditional accuracy cacc_k (step k right given steps < k right at
    the same index) and the conditional simulated acceptance 1 + sum_k prod_{j<=k} cacc_j: what a
    chain draft's acceptance is made of, where sim_tau multiplies marginal accuracies."""
    correct, count = correct.detach().double().cpu(), count.detach().double().cpu()
    acc = correct / count.clamp(min=1)
    m: dict[str, float] = {f"acc_{k}": float(a) for k, a in enumerate(acc)}
    if loss_sum is not None:
        loss = loss_sum.detach().double().cpu() / count.clamp(min=1)
        m.update({f"loss_{k}": float(v) for k, v in enumerate(loss)})
    m["sim_tau"] = 1.0 + float(torch.cumprod(acc, 0).sum())
    if chain is not None and chain_base is not None:
        cacc = chain.detach().double().cpu() / chain_base.detach().double().cpu().clamp(min=1)
        m.update({f"cacc_{k}": float(a) for k, a in enumerate(cacc)})
        m["cond_tau"] = 1.0 + float(torch.cumprod(cacc, 0).sum())
    return m
