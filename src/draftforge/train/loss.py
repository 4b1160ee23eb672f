"""TTT loss pieces that never hold full-vocabulary or [rows, draft_vocab] logits for long
sequences (DESIGN 2.1, 2.5).

- `teacher_targets`: the target's distribution restricted to the draft vocabulary (its logits,
  kept in the compute dtype) and whether the full-vocabulary argmax is a draft token, found by
  streaming the non-draft rows of the target lm_head in chunks (no grad).
- `fused_linear_soft_ce`: draft lm_head + soft cross-entropy against the teacher, chunk by chunk;
  the gradients w.r.t. the hidden rows and the lm_head weight are computed in the forward pass
  (Liger-style), so only [rows, H] and [Dv, H] survive to the backward.
- `ttt_objective`, `ttt_metrics`: the weighted sum over steps, and acc_k / loss_k / simulated tau.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype in effect: autocast's when enabled on x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


@dataclass
class TeacherTargets:
    logits: Tensor  # [N, Dv] target logits over the draft vocabulary (compute dtype)
    argmax: Tensor  # [N] long, draft id of the teacher's top token within the draft vocabulary
    in_draft: Tensor  # [N] bool, the full-vocabulary argmax is a draft token


@torch.no_grad()
def teacher_targets(
    final_hidden: Tensor, lm_head_weight: Tensor, t2d: Tensor, max_chunk_elems: int = 1 << 24
) -> TeacherTargets:
    """final_hidden [N, Ht] (after the target's final norm), lm_head_weight [V, Ht], t2d [V] bool."""
    dt = compute_dtype(final_hidden)
    dev = final_hidden.device.type
    with torch.autocast(dev, enabled=False):
        x = final_hidden.to(dt)
        t2d = t2d.to(lm_head_weight.device)
        draft_ids = torch.nonzero(t2d).flatten()
        other_ids = torch.nonzero(~t2d).flatten()
        logits = x @ lm_head_weight.index_select(0, draft_ids).to(dt).T
        d_arg = logits.argmax(-1)
        d_max = logits.gather(1, d_arg[:, None]).squeeze(1)
        d_tid = draft_ids[d_arg]
        n = x.shape[0]
        o_max = torch.full((n,), float("-inf"), dtype=dt, device=x.device)
        o_tid = torch.full((n,), lm_head_weight.shape[0], dtype=torch.long, device=x.device)
        chunk = max(256, max_chunk_elems // max(n, 1))
        for i in range(0, len(other_ids), chunk):  # ascending ids: strict > keeps the first maximum
            ids = other_ids[i : i + chunk]
            c = x @ lm_head_weight.index_select(0, ids).to(dt).T
            c_arg = c.argmax(-1)
            c_max = c.gather(1, c_arg[:, None]).squeeze(1)
            better = c_max > o_max
            o_max = torch.where(better, c_max, o_max)
            o_tid = torch.where(better, ids[c_arg], o_tid)
        in_draft = (d_max > o_max) | ((d_max == o_max) & (d_tid < o_tid))
    return TeacherTargets(logits=logits, argmax=d_arg, in_draft=in_draft)


class _FusedLinearSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: Tensor,
        weight: Tensor,
        t_logits: Tensor,
        t_rows: Tensor,
        t_argmax: Tensor,
        dt: torch.dtype,
        chunk: int,
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.w_dtype = weight.dtype
        n = h.shape[0]
        w = weight.to(dt)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=acc, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, n, chunk):
                hc = h[i : i + chunk].to(dt)
                rows = t_rows[i : i + chunk]
                z = hc @ w.T
                lsm = torch.log_softmax(z, dim=-1, dtype=acc)
                del z
                pt = torch.softmax(t_logits.index_select(0, rows), dim=-1, dtype=acc)
                loss -= torch.linalg.vecdot(pt, lsm).sum()
                correct += (lsm.argmax(-1) == t_argmax.index_select(0, rows)).sum()
                if need_h or need_w:
                    g = lsm.exp_().sub_(pt).to(dt)  # d loss / d logits = softmax(draft) - teacher
                    del pt, lsm
                    if need_h:
                        grad_h[i : i + chunk] = g @ w
                    if need_w:
                        grad_w += (g.T @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, d_loss: Tensor, _d_correct: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * d_loss.to(grad_h.dtype)) if grad_h is not None else None
        gw = (grad_w * d_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def fused_linear_soft_ce(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor,
    teacher_rows: Tensor,
    teacher_argmax: Tensor,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Sum over rows of CE(softmax(teacher_logits[teacher_rows]), log_softmax(hidden @ weight.T)).

    hidden [n, H] (already normed), weight [Dv, H], teacher_logits [N, Dv], teacher_rows [n] long
    (row of each hidden row in teacher_logits), teacher_argmax [N]. Returns (loss_sum float32
    (float64 for a float64 model),
    correct long: rows whose draft argmax equals the teacher's). Matmuls in the autocast dtype
    when autocast is on; softmax and accumulation in float32.
    """
    dt = compute_dtype(hidden)
    return _FusedLinearSoftCE.apply(hidden, weight, teacher_logits, teacher_rows, teacher_argmax, dt, chunk)


def ttt_objective(out, counts: Tensor | None = None, decay: float = 0.8) -> Tensor:
    """sum_k decay^k * loss_sum_k / max(count_k, 1). Pass `counts` all-reduced over data-parallel
    ranks (and accumulation micro-batches) to get the global mean per step."""
    counts = out.count if counts is None else counts
    loss_sum = out.loss_sum
    k = torch.arange(loss_sum.shape[0], device=loss_sum.device, dtype=loss_sum.dtype)
    w = decay**k / counts.to(loss_sum.device, loss_sum.dtype).clamp(min=1)
    return (loss_sum * w).sum()


def ttt_metrics(correct: Tensor, count: Tensor, loss_sum: Tensor | None = None) -> dict[str, float]:
    """acc_k, loss_k (when loss sums are given) and simulated acceptance 1 + sum_k prod_{j<=k} acc_j."""
    correct, count = correct.detach().double().cpu(), count.detach().double().cpu()
    acc = correct / count.clamp(min=1)
    m: dict[str, float] = {f"acc_{k}": float(a) for k, a in enumerate(acc)}
    if loss_sum is not None:
        loss = loss_sum.detach().double().cpu() / count.clamp(min=1)
        m.update({f"loss_{k}": float(v) for k, v in enumerate(loss)})
    m["sim_tau"] = 1.0 + float(torch.cumprod(acc, 0).sum())
    return m
