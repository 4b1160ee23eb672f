"""The DFlash block objective: random anchors in assistant spans, one block of mask tokens per anchor,
each block position taught the target's distribution of the token at its position.

For an anchor a (an assistant token whose successor is supervised) the block is
[x[a], MASK x (T-1)] at positions a..a+T-1; it sees the context (target features) at indices < a,
as at decoding time, where the block starts at the last accepted token whose target features do not
exist yet. Block position j >= 1 drafts x[a+j]; its teacher is the target's distribution at index
a+j-1 (restricted to the draft vocabulary), supervised where the trainer's teacher rows are
(`teacher_row_mask`: x[a+j] is a valid assistant token) and the target's full-vocabulary argmax
is a draft token. Position j weighs exp(-(j-1)/gamma) (the DFlash paper's decay); the step's loss
is the weighted mean over its supervised positions, as in the reference, normalised by counts known
before the forward (`block_targets`) so data-parallel ranks compute one process's step.

Anchors are drawn per sample without replacement (up to `num_anchors`), from the torch RNG: a
resumed run restores that RNG, so it draws the same anchors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from draftforge.data.batch import teacher_row_mask
from draftforge.draft.dflash import DFlashDraft
from draftforge.target.base import TargetHead
from draftforge.train.loss import fused_linear_soft_ce, step_weights, teacher_targets
from draftforge.train.ttt import TTTOutput


def anchor_candidates(loss_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L] bool: assistant tokens whose next token is a supervised target (a block there teaches
    at least its first drafted position)."""
    rows = teacher_row_mask(loss_mask, attention_mask)
    return rows & loss_mask.bool() & attention_mask.bool()


def sample_anchors(loss_mask: Tensor, attention_mask: Tensor, num_anchors: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """[B, N] long anchor indices, ascending per row, -1 where a row has fewer than N candidates;
    N = min(num_anchors, most candidates in a row). Uniform without replacement."""
    cand = anchor_candidates(loss_mask, attention_mask).cpu()
    n = min(num_anchors, int(cand.sum(1).max())) if cand.numel() else 0
    if n == 0:
        return torch.full((loss_mask.shape[0], 0), -1, dtype=torch.long)
    keys = torch.rand(cand.shape, generator=generator).masked_fill_(~cand, 2.0)
    picked = keys.topk(n, dim=1, largest=False)
    idx = torch.where(picked.values < 2.0, picked.indices, cand.shape[1])  # padding sorts last
    idx = idx.sort(dim=1).values
    return torch.where(idx < cand.shape[1], idx, -1)


def label_index(anchors: Tensor, block_size: int) -> Tensor:
    """[B, N, T-1]: the index of the target row teaching block position j = 1..T-1 (a + j - 1)."""
    return anchors[..., None] + torch.arange(block_size - 1, device=anchors.device)


def supervised(anchors: Tensor, rows: Tensor, block_size: int) -> Tensor:
    """[B, N, T-1] bool: block position j of anchor a is taught iff a is real and `rows` (a [B, L]
    teacher-row mask) holds at index a + j - 1."""
    L = rows.shape[1]
    u = label_index(anchors, block_size)
    ok = (anchors[..., None] >= 0) & (u < L)
    return ok & rows.gather(1, u.clamp(0, L - 1).flatten(1)).view(u.shape)


def block_targets(anchors: Tensor, loss_mask: Tensor, attention_mask: Tensor, block_size: int) -> Tensor:
    """[T-1] long: taught positions per block position, known before any forward (a target whose
    teacher argmax is outside the draft vocabulary counts but adds no loss, as in TTT)."""
    rows = teacher_row_mask(loss_mask, attention_mask)
    return supervised(anchors.to(rows.device), rows, block_size).sum((0, 1))


def default_gamma(block_size: int) -> float:
    """The DFlash reference suggests gamma 4 / 5 / 7 for blocks of 8 / 10 / 16: about half the block.
    Position j >= 1 weighs exp(-(j-1)/gamma)."""
    return max(1.0, block_size / 2)


class DFlashObjective(nn.Module):
    """The DFlash block objective as a module forward (DDP / FSDP2 act on forward calls); what the
    trainer trains, with the same outputs as the TTT unroll: per block position the loss sum, top-1
    agreements and taught positions."""

    def __init__(self, draft: DFlashDraft, head: TargetHead, num_anchors: int = 512, gamma: float | None = None,
                 loss_chunk: int | None = None) -> None:
        super().__init__()
        self.draft, self.head = draft, head
        self.num_anchors, self.loss_chunk = num_anchors, loss_chunk
        self.block_size = draft.config.block_size
        gamma = default_gamma(self.block_size) if gamma is None else gamma
        self.decay = math.exp(-1.0 / gamma) if gamma > 0 else 1.0  # position j (0-based) weighs decay**j

    @property
    def positions(self) -> int:
        """Metric slots: the drafted block positions."""
        return self.block_size - 1

    def prepare(self, batch, train: bool = True) -> tuple[list[Tensor], Tensor]:
        """([anchors [B, N]], taught positions [T-1]) of a trainer Batch, before its forward. Training
        draws from the torch RNG (restored on resume); evaluation always draws the same anchors."""
        gen = None if train else torch.Generator().manual_seed(0)
        anchors = sample_anchors(batch.loss_mask, batch.attention_mask, self.num_anchors, gen)
        return [anchors], block_targets(anchors, batch.loss_mask, batch.attention_mask, self.block_size)

    def objective(self, out: TTTOutput, targets: Tensor) -> Tensor:
        """Weighted mean over the step's taught positions: sum_j w_j loss_j / sum_j w_j n_j, with n_j
        the global (all ranks, all micro-batches) counts, as the reference normalises."""
        loss_sum = out.loss_sum
        w = step_weights(len(loss_sum), self.decay, loss_sum)
        return (w * loss_sum).sum() / (w * targets.to(loss_sum.device, loss_sum.dtype)).sum().clamp(min=1)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.unroll(*inputs)  # plain tensors out: FSDP2 hooks its backward onto them
        return out.loss_sum, out.correct, out.count, out.chain, out.chain_base

    def unroll(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, anchors: Tensor, aux: Tensor,
               final_hidden: Tensor) -> TTTOutput:
        """input_ids / masks [B, L] (right padded), anchors [B, N] (-1: none), aux [B, L, taps*H_t],
        final_hidden [B, L, H_t] -> per drafted block position j = 1..T-1: loss sum, top-1 agreements,
        taught positions, and the chain counts (blocks right at 1..j / right at 1..j-1 and taught at j)."""
        d, T = self.draft, self.block_size
        B, L = input_ids.shape
        dev = input_ids.device
        anchors = anchors.to(dev)
        rows = teacher_row_mask(loss_mask, attention_mask)
        cand_idx = torch.nonzero(rows.flatten()).flatten()
        teacher = teacher_targets(final_hidden.flatten(0, 1).index_select(0, cand_idx), self.head.weight, d.t2d,
                                  logit_softcap=self.head.logit_softcap)
        row_of = torch.full((B * L,), -1, dtype=torch.long, device=dev)
        row_of[cand_idx] = torch.arange(len(cand_idx), device=dev)
        taught_row = torch.zeros(B * L, dtype=torch.bool, device=dev)
        taught_row[cand_idx] = teacher.in_draft

        real = anchors >= 0
        a = anchors.clamp(min=0)
        positions = a[..., None] + torch.arange(T, device=dev)  # [B, N, T]
        ids = d.block_ids(input_ids.gather(1, a))
        ctx = d.context(aux)
        ctx_kv = d.context_kv(ctx, torch.arange(L, device=dev)[None])
        ctx_mask = (torch.arange(L, device=dev) < a[..., None]) & attention_mask.bool()[:, None] & real[..., None]
        out = d.blocks(ids, positions, ctx_kv, ctx_mask)[:, :, 1:]  # [B, N, T-1, H]: drafted positions

        sup = supervised(anchors, rows, T)
        u = label_index(a, T) + torch.arange(B, device=dev)[:, None, None] * L  # flat teacher index
        weight = d.head_weight()
        losses, corrects, counts, chain, chain_base = [], [], [], [], []
        alive = real.clone()  # blocks whose drafts are all right so far
        for j in range(T - 1):
            sel = sup[:, :, j]
            flat_u = u[:, :, j][sel]
            keep = taught_row[flat_u]
            loss, hits = fused_linear_soft_ce(d.norm(out[:, :, j][sel][keep]), weight, teacher.probs,
                                              row_of[flat_u[keep]], teacher.argmax, self.loss_chunk)
            right = torch.zeros_like(sel)
            right[sel] = torch.zeros_like(keep).masked_scatter_(keep, hits)
            losses.append(loss)
            corrects.append(hits.sum())
            counts.append(flat_u.numel())
            chain_base.append((alive & sel).sum())
            alive &= right
            chain.append(alive.sum())
        return TTTOutput(torch.stack(losses), torch.stack(corrects), torch.tensor(counts, dtype=torch.long, device=dev),
                         torch.stack(chain), torch.stack(chain_base))
