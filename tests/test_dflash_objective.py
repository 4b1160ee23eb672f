"""The DFlash block objective against a small dense reference: every anchor's block run alone over
the context before it (as a decoder runs it), dense teacher softmax over the draft vocabulary,
plain soft cross-entropy; losses, agreements, counts and gradients must match."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from draftforge.target.base import TargetHead
from draftforge.target.hf import HFTarget
from draftforge.train.dflash_objective import (
    DFlashObjective,
    anchor_candidates,
    block_targets,
    default_gamma,
    sample_anchors,
)
from draftforge.train.loss import step_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_dflash_model import tiny_draft  # noqa: E402


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (3, 36), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 25:] = 0
    attn[2, 31:] = 0
    loss = torch.zeros_like(ids)
    loss[0, 8:20] = loss[0, 26:] = 1  # two assistant turns
    loss[1, 5:] = 1
    loss[2, 12:] = 1
    return ids, attn, loss * attn


def test_anchor_sampling():
    ids, attn, loss = batch()
    cand = anchor_candidates(loss, attn)
    assert not cand[0, 19] and cand[0, 18] and not cand[1, 24] and cand[1, 23]  # the next token must be taught
    g = torch.Generator().manual_seed(3)
    a = sample_anchors(loss, attn, 12, g)
    assert a.shape == (3, 12)
    for row in range(3):
        got = a[row][a[row] >= 0]
        assert len(got) == min(12, int(cand[row].sum())) and torch.all(got[1:] > got[:-1])
        assert cand[row, got].all()
    assert torch.equal(a, sample_anchors(loss, attn, 12, torch.Generator().manual_seed(3)))
    every = sample_anchors(loss, attn, 1000, g)  # more asked than there are: all, padded with -1
    assert every.shape[1] == int(cand.sum(1).max()) and (every[1] == -1).sum() == every.shape[1] - cand[1].sum()


def test_position_weights():
    """exp(-(j-1)/gamma) for drafted position j = 1..T-1, gamma about half the block (4 for 8)."""
    _, draft = tiny_draft(block_size=8)
    obj = DFlashObjective(draft, TargetHead(torch.zeros(512, 64)))
    assert default_gamma(8) == 4.0 and default_gamma(16) == 8.0 and obj.positions == 7
    w = step_weights(7, obj.decay, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(w, torch.exp(-torch.arange(7, dtype=torch.float64) / 4))
    assert DFlashObjective(draft, TargetHead(torch.zeros(512, 64)), gamma=0).decay == 1.0
    assert math.isclose(DFlashObjective(draft, TargetHead(torch.zeros(512, 64)), gamma=2.0).decay, math.exp(-0.5))


def dense_objective(draft, head: TargetHead, ids, attn, loss_mask, anchors, aux, final_hidden):
    """Per block position j: (soft-CE sum, agreements, count), one block at a time."""
    T = draft.config.block_size
    logits_t = final_hidden @ head.weight.T  # [B, L, V], dense
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(T - 1)]
    correct, count, chain, chain_base = [0] * (T - 1), [0] * (T - 1), [0] * (T - 1), [0] * (T - 1)
    for b in range(ids.shape[0]):
        for a in anchors[b][anchors[b] >= 0].tolist():
            kv = draft.context_kv(draft.context(aux[b : b + 1, :a]), torch.arange(a)[None])
            pos = (a + torch.arange(T))[None, None]
            out = draft.blocks(draft.block_ids(ids[b : b + 1, a : a + 1]), pos, kv,
                               torch.ones(1, 1, a, dtype=torch.bool))[0, 0]
            q = torch.log_softmax(draft.logits(out).double(), -1)
            alive = True  # every drafted position so far right
            for j in range(1, T):
                u = a + j - 1
                taught = u + 1 < ids.shape[1] and bool(loss_mask[b, u + 1] and attn[b, u + 1])
                chain_base[j - 1] += int(alive and taught)
                right = False
                if taught:
                    count[j - 1] += 1
                    full = logits_t[b, u]
                    if draft.t2d[full.argmax()]:  # else counted, not taught: the target's choice is no draft token
                        p = torch.softmax(full[draft.t2d].double(), -1)
                        sums[j - 1] = sums[j - 1] - (p * q[j]).sum()
                        right = bool(q[j].argmax() == p.argmax())
                        correct[j - 1] += int(right)
                alive = alive and right
                chain[j - 1] += int(alive)
    return torch.stack(sums), *(torch.tensor(x) for x in (correct, count, chain, chain_base))


@pytest.mark.parametrize("vocab", [None, 200])
def test_objective_equals_dense_reference(vocab):
    target, draft = tiny_draft(num_layers=2, draft_vocab_size=vocab)
    if vocab:  # a random sorted draft vocabulary (own head), so some teacher rows fall outside it
        g = torch.Generator().manual_seed(5)
        keep = torch.sort(torch.randperm(512, generator=g)[:vocab]).values
        t2d = torch.zeros(512, dtype=torch.bool)
        t2d[keep] = True
        draft.set_vocab_mapping(keep - torch.arange(vocab), t2d)
    ids, attn, loss = batch(1)
    feats = HFTarget(target, draft.config.aux_layer_ids).features(ids, attn)
    head = TargetHead(target.get_output_embeddings().weight.detach())
    obj = DFlashObjective(draft, head, num_anchors=10)
    torch.manual_seed(0)
    (anchors,), targets = obj.prepare(SimpleNamespace(loss_mask=loss, attention_mask=attn))
    out = obj.unroll(ids, attn, loss, anchors, feats.aux, feats.final_hidden)
    ref = dense_objective(draft, head, ids, attn, loss, anchors, feats.aux, feats.final_hidden)
    torch.testing.assert_close(out.loss_sum, ref[0])
    for got, want in zip((out.correct, out.count, out.chain, out.chain_base), ref[1:], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(targets, out.count) and out.count.sum() > 40 and (ref[0] > 0).all()

    # gradients of the objective equal the dense reference's
    params = [p for p in draft.parameters() if p.requires_grad]
    grads = torch.autograd.grad(obj.objective(out, targets), params)
    w = step_weights(obj.positions, obj.decay, ref[0])
    dense = (w * ref[0]).sum() / (w * ref[2]).sum()
    for got, want in zip(grads, torch.autograd.grad(dense, params), strict=True):
        torch.testing.assert_close(got, want)


def test_targets_known_before_the_forward_match_every_batch():
    ids, attn, loss = batch(2)
    for n in (1, 4, 50):
        anchors = sample_anchors(loss, attn, n, torch.Generator().manual_seed(n))
        t = block_targets(anchors, loss, attn, 6)
        # position j is taught iff x[a+j] is a real assistant token
        manual = torch.zeros(5, dtype=torch.long)
        for b in range(3):
            for a in anchors[b][anchors[b] >= 0].tolist():
                for j in range(1, 6):
                    manual[j - 1] += int(a + j < 36 and bool(loss[b, a + j]) and bool(attn[b, a + j]))
        assert torch.equal(t, manual)


def test_a_few_steps_learn():
    """Adam on one batch: the weighted loss falls and agreement rises (the objective trains the draft);
    the trained draft's agreement and chain counts (now far from zero) still equal the dense reference's."""
    target, draft = tiny_draft()
    with torch.no_grad():  # a sharp next-token distribution, like a trained model's (conftest does the same)
        target.get_output_embeddings().weight.mul_(30.0)
    ids, attn, loss = batch(3)
    feats = HFTarget(target, draft.config.aux_layer_ids).features(ids, attn)
    obj = DFlashObjective(draft, TargetHead(target.get_output_embeddings().weight.detach()), num_anchors=16)
    (anchors,), targets = obj.prepare(SimpleNamespace(loss_mask=loss, attention_mask=attn), train=False)
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        out = obj.unroll(ids, attn, loss, anchors, feats.aux, feats.final_hidden)
        value = obj.objective(out, targets)
        correct = out.correct
        first = first if first is not None else (value.item(), int(correct.sum()))
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.7 * first[0] and int(correct.sum()) > first[1]
    with torch.no_grad():
        out = obj.unroll(ids, attn, loss, anchors, feats.aux, feats.final_hidden)
        ref = dense_objective(draft, obj.head, ids, attn, loss, anchors, feats.aux, feats.final_hidden)
    assert out.chain[1] > 0
    for got, want in zip((out.correct, out.count, out.chain, out.chain_base), ref[1:], strict=True):
        assert torch.equal(got, want)
