"""The acceptance rules on hand-made tensors, without a model: the greedy tree walk and chain rejection sampling."""

from __future__ import annotations

import torch

from draftforge.decode.acceptance import reject_chain, sample, walk_tree


def test_walk_tree_follows_the_target_token_and_stops_at_a_miss():
    # root 0 -> 1 (token 10), 2 (token 11); 1 -> 3 (token 12); 2 -> 4 (token 13)
    tokens = torch.tensor([[5, 10, 11, 12, 13]]).expand(3, 5)
    parent = torch.tensor([[0, 0, 0, 1, 2]]).expand(3, 5)
    depth = torch.tensor([[0, 1, 1, 2, 2]]).expand(3, 5)
    y = torch.tensor([
        [11, 0, 13, 0, 99],  # second child, then its child, bonus after it
        [10, 50, 0, 0, 0],  # first child, then a miss: bonus = y there
        [7, 10, 11, 12, 13],  # a miss at the root (the children's own y do not matter)
    ])  # fmt: skip
    path, n, bonus = walk_tree(tokens, parent, depth, y)
    assert path.tolist() == [[0, 2, 4], [0, 1, 1], [0, 0, 0]]
    assert n.tolist() == [2, 1, 0]
    assert bonus.tolist() == [99, 50, 7]


def test_reject_chain_accepts_a_draft_equal_to_the_target_and_rejects_an_impossible_one():
    p = torch.softmax(torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0)), -1)
    drafted = torch.tensor([[1, 2]] * 4)
    n, _ = reject_chain(drafted, p[:, :2].clone(), p, torch.Generator().manual_seed(1))
    assert n.tolist() == [2] * 4  # q == p: p / q = 1 everywhere
    p[:, 0, 1] = 0.0
    q = torch.nn.functional.one_hot(drafted, 6).double()
    n, bonus = reject_chain(drafted, q, p / p.sum(-1, keepdim=True), torch.Generator().manual_seed(1))
    assert n.tolist() == [0] * 4 and 1 not in bonus.tolist()


def test_reject_chain_emits_the_target_distribution():
    """The first emitted token (the draft's when accepted, else the bonus) is distributed as p, whatever q is."""
    gen = torch.Generator().manual_seed(0)
    B, V = 40000, 5
    p = torch.softmax(2 * torch.randn(1, 2, V, generator=gen), -1).expand(B, 2, V)
    q = torch.softmax(2 * torch.randn(1, 1, V, generator=gen), -1).expand(B, 1, V)
    drafted = sample(q, gen)
    n, bonus = reject_chain(drafted, q, p, gen)
    first = torch.where(n > 0, drafted[:, 0], bonus)
    freq = torch.bincount(first, minlength=V) / B
    assert 0.1 < (n > 0).float().mean() < 0.9  # both branches taken
    torch.testing.assert_close(freq, p[0, 0].float(), atol=0.01, rtol=0)
