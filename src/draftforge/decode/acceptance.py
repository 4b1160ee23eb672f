"""Which drafted tokens the target accepts: pure functions on tensors, the same for every draft family.

Greedy walks the drafted tree along the target's argmax. Sampling (temperature > 0) is lossless two
ways: a chain drafted by sampling q is verified by standard rejection sampling (`reject_chain`); a
tree keeps its deterministic top-k nodes and is verified "target-only" (`walk_tree` with one y ~ p
drawn per node): the walk moves to the child equal to y, or stops and emits y. Every emitted token is
a sample of the target's conditional distribution; the tree form is SpecInfer's multi-candidate rule
with one-hot proposals (SGLang's `tree_speculative_sampling_target_only`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One sample per row of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """The argmax at temperature 0, else a sample of softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return sample(torch.softmax(logits.float() / temperature, dim=-1), generator)


def walk_tree(tokens: Tensor, parent: Tensor, depth: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Follow the target's token y from the root: (path [B, D+1] node indices, accepted count n [B], bonus [B]).

    tokens, parent, depth, y: [B, T], node 0 = the root (the last committed token); y[b, i] is the
    target's token after node i (its argmax, or one sample of it). At each level the walk moves to the
    child of the current node whose token is y there; where there is none it stays, and the bonus
    token is y at the last node reached.
    """
    B, T = tokens.shape
    cur = torch.zeros(B, dtype=torch.long, device=tokens.device)
    n = torch.zeros(B, dtype=torch.long, device=tokens.device)
    path = [cur]
    not_root = torch.arange(T, device=tokens.device)[None] > 0
    for _ in range(int(depth.max())):
        want = y.gather(1, cur[:, None])
        hit = (parent == cur[:, None]) & (tokens == want) & not_root
        has = hit.any(1)
        cur = torch.where(has, hit.long().argmax(1), cur)
        n = n + has.long()
        path.append(cur)
    return torch.stack(path, 1), n, y.gather(1, cur[:, None])[:, 0]


def reject_chain(
    drafted: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Rejection sampling of a sampled chain: (accepted count n [B], bonus token [B]).

    drafted [B, K] target ids drawn from q [B, K, V]; p [B, K+1, V] the target's distributions after
    the root and after each drafted token. d_j is accepted with prob min(1, p(d_j) / q(d_j)); the first
    rejected position samples max(p - q, 0) (renormalised), a fully accepted chain samples p there.
    """
    K = drafted.shape[1]
    pd = p[:, :-1].gather(-1, drafted[..., None])[..., 0]
    qd = q.gather(-1, drafted[..., None])[..., 0]
    u = torch.rand(pd.shape, generator=generator, device=drafted.device)
    n = (u * qd < pd).long().cumprod(1).sum(1)
    full = n == K
    at_n = n[:, None, None].expand(-1, 1, p.shape[-1])
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, at_n)[:, 0]
    p_n = p.gather(1, at_n)[:, 0]
    resid = (p_n - q_next).clamp(min=0)
    resid = torch.where(full[:, None] | (resid.sum(-1, keepdim=True) <= 0), p_n, resid)
    return n, sample(resid / resid.sum(-1, keepdim=True), generator)
