"""Training-time test: the K-step unroll of the draft over a batch of target features
(docs/design.md §3, §5).

Step k at index t sees embed(x[t+1+k]), the hidden fc(aux[t]) (k = 0) or its own step k-1
pre-norm output at t, RoPE position t+k, and is taught the target's draft-vocabulary
distribution at index t+1+k. A row is supervised iff t+2+k is a valid index, the predicted token
x[t+2+k] is an assistant token (loss_mask) and the target's full-vocabulary argmax at t+1+k is a
draft token. Teacher probabilities are computed once per index and shared by all steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from draftforge.data.batch import teacher_row_mask
from draftforge.draft.attention import ttt_attention
from draftforge.draft.model import Eagle3Draft
from draftforge.train.loss import (
    compute_dtype,
    fused_linear_soft_ce,
    teacher_targets,
    ttt_metrics,
    ttt_objective,
)

__all__ = ["TTTOutput", "ttt_forward", "ttt_objective", "ttt_metrics"]


@dataclass
class TTTOutput:
    loss_sum: Tensor  # [K] float32, differentiable: sum of soft-CE over supervised rows per step
    correct: Tensor  # [K] long: rows whose teacher top token is a top draft logit (top-1 agreement)
    count: Tensor  # [K] long: supervised rows per step
    chain: Tensor  # [K] long: rows right at every step 0..k (what a k+1-token draft gets accepted)
    chain_base: Tensor  # [K] long: rows right at steps 0..k-1 and supervised at step k

    def metrics(self) -> dict[str, float]:
        return ttt_metrics(self.correct, self.count, self.loss_sum, self.chain, self.chain_base)


def ttt_forward(
    draft: Eagle3Draft,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    aux: Tensor,
    final_hidden: Tensor,
    target_lm_head_weight: Tensor,
    steps: int = 7,
    attention: str = "efficient",
    checkpoint: bool = False,
    loss_chunk: int | None = None,
    logit_softcap: float | None = None,
) -> TTTOutput:
    """input_ids / attention_mask / loss_mask [B, L] (right padded), aux [B, L, 3*Ht],
    final_hidden [B, L, Ht] (after the target's final norm), target_lm_head_weight [V, Ht].
    `checkpoint` recomputes each step's layer in backward instead of keeping its activations;
    `logit_softcap` is the target's final logit capping (Gemma-2), applied to the teacher."""
    B, L = input_ids.shape
    dev = input_ids.device
    layer = draft.midlayer

    # teacher, once per index u = t+1+k: rows where x[u+1] is a valid assistant token
    cand_idx = torch.nonzero(teacher_row_mask(loss_mask, attention_mask).flatten()).flatten()
    teacher = teacher_targets(
        final_hidden.flatten(0, 1).index_select(0, cand_idx), target_lm_head_weight, draft.t2d,
        logit_softcap=logit_softcap,
    )
    row_of = torch.full((B * L,), -1, dtype=torch.long, device=dev)
    row_of[cand_idx] = torch.arange(len(cand_idx), device=dev)
    sup_u = torch.zeros(B * L, dtype=torch.bool, device=dev)
    sup_u[cand_idx] = teacher.in_draft
    sup_u = sup_u.view(B, L)

    ids = F.pad(input_ids, (0, steps), value=0)  # positions past the end are never read by valid rows
    with torch.no_grad():  # frozen; cast once to the compute dtype rather than once per step
        emb_all = draft.embed_tokens(ids)
        emb_all = emb_all.to(compute_dtype(emb_all))
    cos_all, sin_all = draft.rotary(torch.arange(L + steps, device=dev))

    head_lo = draft.lm_head.weight.detach()
    head_lo = head_lo.to(compute_dtype(head_lo))  # converted once for all steps, not once per step
    e_part = layer.embed_part(emb_all)  # token-only half of q/k/v, shared by all steps
    h = draft.project(aux)
    ks: list[Tensor] = []
    vs: list[Tensor] = []
    losses, corrects, counts, chain, chain_base = [], [], [], [], []
    alive = torch.ones(B * L, dtype=torch.bool, device=dev)  # indices whose draft is right so far
    for k in range(steps):
        ep = e_part[:, 1 + k : 1 + k + L]
        cos, sin = cos_all[None, k : k + L], sin_all[None, k : k + L]

        def run(h: Tensor, *cache: Tensor, ep=ep, cos=cos, sin=sin) -> tuple[Tensor, Tensor, Tensor]:
            n = len(cache) // 2
            q, kk, vv = layer.qkv(None, h, cos, sin, emb_part=ep)
            attn = ttt_attention(q, [*cache[:n], kk], [*cache[n:], vv], impl=attention)
            return layer.finish(h, attn), kk, vv

        if checkpoint and torch.is_grad_enabled():
            out, kk, vv = _checkpoint(run, h, *ks, *vs, use_reentrant=False)
        else:
            out, kk, vv = run(h, *ks, *vs)
        ks.append(kk)
        vs.append(vv)

        # supervised rows of step k: index t with teacher index u = t+1+k
        sup = torch.zeros(B, L, dtype=torch.bool, device=dev)
        sup[:, : L - 1 - k] = sup_u[:, 1 + k :]
        t_idx = torch.nonzero(sup.flatten()).flatten()
        u_idx = t_idx + 1 + k
        rows = out.flatten(0, 1).index_select(0, t_idx)
        loss, hits = fused_linear_soft_ce(
            draft.norm(rows), draft.lm_head.weight, teacher.probs, row_of[u_idx], teacher.argmax, loss_chunk,
            weight_lo=head_lo,
        )
        losses.append(loss)
        corrects.append(hits.sum())
        counts.append(t_idx.numel())
        right = torch.zeros(B * L, dtype=torch.bool, device=dev)
        right[t_idx] = hits
        chain_base.append((alive & sup.flatten()).sum())
        alive &= right
        chain.append(alive.sum())
        h = out
    return TTTOutput(
        loss_sum=torch.stack(losses),
        correct=torch.stack(corrects),
        count=torch.tensor(counts, dtype=torch.long, device=dev),
        chain=torch.stack(chain),
        chain_base=torch.stack(chain_base),
    )
