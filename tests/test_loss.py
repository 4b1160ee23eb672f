"""Streamed teacher and fused chunked soft-CE against a naive full-materialisation version."""

import pytest
import torch

from draftforge.train.loss import fused_linear_soft_ce, teacher_targets, ttt_metrics, ttt_objective
from draftforge.train.ttt import TTTOutput

N, H, V, DV = 37, 16, 300, 40


def _vocab(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.randperm(V, generator=g)[:DV]] = True
    return t2d


def test_teacher_targets_match_full_logits():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    t2d = _vocab()
    # make some argmaxes land in the draft vocab, some outside
    w[t2d.nonzero()[:3].flatten()] *= 3
    full = x @ w.T
    t = teacher_targets(x, w, t2d, row_chunk=10, vocab_chunk=64)  # several row and vocab chunks
    assert torch.allclose(t.probs, torch.softmax(full[:, t2d], -1), rtol=1e-12, atol=1e-14)
    assert torch.equal(t.argmax, full[:, t2d].argmax(-1))
    assert torch.equal(t.in_draft, t2d[full.argmax(-1)])
    assert 0 < t.in_draft.sum() < N


def test_teacher_targets_tie_goes_to_lower_id():
    x = torch.ones(1, 2)
    w = torch.zeros(6, 2)
    t2d = torch.tensor([False, False, True, True, False, False])
    w[[1, 3]] = 1.0  # equal top logits: id 1 (non-draft) wins, as argmax over the full vocab
    assert not teacher_targets(x, w, t2d).in_draft.item()
    w[1] = 0.0
    w[5] = 1.0  # now draft id 3 comes first
    assert teacher_targets(x, w, t2d).in_draft.item()


def _naive(h, w, t_logits, rows):
    z = h @ w.T
    pt = torch.softmax(t_logits[rows].double(), -1)
    loss = -(pt * torch.log_softmax(z.double(), -1)).sum()
    correct = z.argmax(-1) == t_logits[rows].argmax(-1)
    return loss, correct


def _probs(t_logits):
    return torch.softmax(t_logits.double(), -1).to(t_logits.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk,sub", [(5, 2), (16, 3), (None, None)])
def test_fused_soft_ce_matches_naive(dtype, tol, chunk, sub):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(DV, H, generator=g, dtype=dtype, requires_grad=True)
    t_logits = torch.randn(N + 5, DV, generator=g, dtype=dtype) * 3
    rows = torch.randperm(N + 5, generator=g)[:N]
    loss, hits = fused_linear_soft_ce(h, w, _probs(t_logits), rows, t_logits.argmax(-1), chunk=chunk, sub=sub)
    (loss * 0.37).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, ref_correct = _naive(h, w, t_logits, rows)
    (ref * 0.37).backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert torch.equal(hits, ref_correct)
    assert torch.allclose(gh, h.grad, rtol=tol, atol=tol)
    assert torch.allclose(gw, w.grad, rtol=tol, atol=tol)


def test_fused_soft_ce_bf16_autocast_close():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(DV, H, generator=g, requires_grad=True)
    t_logits = torch.randn(N, DV, generator=g)
    rows = torch.arange(N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_soft_ce(h, w, _probs(t_logits).bfloat16(), rows, t_logits.argmax(-1), chunk=8, sub=3)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, _ = _naive(h, w, t_logits, rows)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 0.02 * abs(ref.item())
    assert (gh - h.grad).abs().max() <= 0.05 * h.grad.abs().max()
    assert (gw - w.grad).abs().max() <= 0.05 * w.grad.abs().max()


def test_fused_soft_ce_weight_converted_once_is_bit_identical():
    """A bf16 copy of the weight passed in (made once per TTT step) changes no bit of loss, hits or grads."""
    g = torch.Generator().manual_seed(4)
    t_logits = torch.randn(N, DV, generator=g)
    probs, rows, top = _probs(t_logits).bfloat16(), torch.arange(N), t_logits.argmax(-1)
    h0, w0 = torch.randn(N, H, generator=g), torch.randn(DV, H, generator=g)
    results = []
    for weight_lo in (None, w0.bfloat16()):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, hits = fused_linear_soft_ce(h, w, probs, rows, top, chunk=8, sub=3, weight_lo=weight_lo)
        loss.backward()
        results.append((loss, hits, h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and the copy is what the matmuls use
        other, _ = fused_linear_soft_ce(h0, w0, probs, rows, top, weight_lo=(2 * w0).bfloat16())
    assert other != results[0][0]
    with pytest.raises(ValueError, match="compute dtype"):
        fused_linear_soft_ce(h0, w0, probs, rows, top, weight_lo=w0.bfloat16())  # no autocast: float32


def test_fused_soft_ce_no_grad():
    h, w, t = torch.randn(N, H), torch.randn(DV, H), torch.randn(N, DV)
    with torch.no_grad():
        loss, _ = fused_linear_soft_ce(h, w, _probs(t), torch.arange(N), t.argmax(-1), chunk=8)
    ref, _ = _naive(h, w, t, torch.arange(N))
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())


def test_objective_and_metrics():
    loss_sum = torch.tensor([4.0, 6.0, 8.0], requires_grad=True)
    out = TTTOutput(loss_sum=loss_sum, correct=torch.tensor([3, 1, 0]), count=torch.tensor([4, 2, 0]),
                    chain=torch.tensor([3, 1, 0]), chain_base=torch.tensor([4, 2, 0]))
    obj = ttt_objective(out)
    assert obj.item() == pytest.approx(4 / 4 + 0.8 * 6 / 2 + 0.64 * 8 / 1)
    obj.backward()
    assert loss_sum.grad.tolist() == pytest.approx([0.25, 0.4, 0.64])
    # global counts (e.g. all-reduced over ranks) replace the local ones
    assert ttt_objective(out, counts=torch.tensor([8, 4, 2])).item() == pytest.approx(0.5 + 1.2 + 2.56)
    m = ttt_metrics(out.correct, out.count, out.loss_sum)
    assert m["acc_0"] == 0.75 and m["acc_1"] == 0.5 and m["acc_2"] == 0.0
    assert m["loss_1"] == 3.0
    assert m["sim_tau"] == pytest.approx(1 + 0.75 + 0.375)
    assert ttt_objective(out, decay=0.5).item() == pytest.approx(4 / 4 + 0.5 * 6 / 2 + 0.25 * 8 / 1)


def test_conditional_metrics_follow_the_chain():
    """cacc_k: right at step k among the rows right at steps < k; cond_tau multiplies those."""
    m = ttt_metrics(torch.tensor([6, 5, 4]), torch.tensor([10, 10, 8]), chain=torch.tensor([6, 3, 1]),
                    chain_base=torch.tensor([10, 6, 2]))
    assert [m["cacc_0"], m["cacc_1"], m["cacc_2"]] == pytest.approx([0.6, 0.5, 0.5])
    assert m["cond_tau"] == pytest.approx(1 + 0.6 + 0.3 + 0.15)
    assert m["sim_tau"] == pytest.approx(1 + 0.6 + 0.3 + 0.15)  # marginals 0.6, 0.5, 0.5: equal by chance here
    m = ttt_metrics(torch.tensor([6, 5]), torch.tensor([10, 10]), chain=torch.tensor([6, 5]),
                    chain_base=torch.tensor([10, 6]))
    assert m["cond_tau"] == pytest.approx(1 + 0.6 + 0.5) and m["sim_tau"] == pytest.approx(1 + 0.6 + 0.3)


def test_fused_soft_ce_no_rows():
    h = torch.zeros(0, H, requires_grad=True)
    w = torch.randn(DV, H, requires_grad=True)
    loss, hits = fused_linear_soft_ce(h, w, torch.zeros(0, DV), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hits.shape == (0,)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_teacher_targets_bf16_ties_follow_full_argmax():
    """bf16 logits tie often; in_draft must still be t2d[argmax] of the full bf16 logits."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-2, 3, (64, H), generator=g).float()  # small integer logits: many exact ties
    w = torch.randint(-2, 3, (V, H), generator=g).float()
    t2d = _vocab(5)
    full = x @ w.T
    assert ((full == full.amax(-1, keepdim=True)).sum(-1) > 1).sum() > 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = teacher_targets(x, w, t2d, row_chunk=16, vocab_chunk=64)
    assert torch.equal(t.in_draft, t2d[full.argmax(-1)])
    assert t.probs.dtype == torch.bfloat16


def test_teacher_applies_the_target_logit_softcap():
    """Gemma-2 caps its logits with tanh: the teacher must be the capped distribution."""
    from draftforge.target.base import TargetHead
    from draftforge.train.loss import teacher_targets

    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64) * 3
    t2d = torch.zeros(40, dtype=torch.bool)
    t2d[::2] = True
    head = TargetHead(weight, logit_softcap=5.0)
    got = teacher_targets(hidden, weight, t2d, logit_softcap=5.0)
    want = torch.softmax(head.logits(hidden, rows=t2d), -1)
    torch.testing.assert_close(got.probs.double(), want)
    plain = teacher_targets(hidden, weight, t2d)
    assert not torch.allclose(plain.probs.double(), want)
    torch.testing.assert_close(got.in_draft, t2d[(hidden @ weight.T).argmax(-1)])
