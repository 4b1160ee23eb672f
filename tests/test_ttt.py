"""ttt_forward against a naive full-materialisation unroll, across attention paths, with
checkpointing, and invariant to what sits in the right padding."""

import pytest
import torch

from draftforge.draft.attention import ttt_attention
from draftforge.draft.model import Eagle3Draft
from draftforge.train.loss import ttt_metrics
from draftforge.train.ttt import ttt_forward, ttt_objective
from tests.test_draft_model import tiny_config

B, L, V, DV, HT = 3, 20, 100, 20, 32
LENGTHS = [20, 14, 6]


def _setup(dtype=torch.float64, seed=0, dv=DV):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    draft = Eagle3Draft(tiny_config(draft_vocab_size=dv)).to(dtype)
    with torch.no_grad():  # larger weights than the 0.02 init so every path matters numerically
        for n, p in draft.named_parameters():
            if p.dim() == 2 and n != "embed_tokens.weight":
                p.normal_(0, 0.3, generator=g)
    draft.load_target_embedding(torch.randn(V, 32, generator=g, dtype=dtype))
    ids = torch.sort(torch.randperm(V, generator=g)[:dv]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_mapping(ids - torch.arange(dv), t2d)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    attention_mask = (torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]).long()
    loss_mask = (torch.rand(B, L, generator=g) < 0.8).long() * attention_mask
    aux = torch.randn(B, L, 3 * HT, generator=g, dtype=dtype)
    final_hidden = torch.randn(B, L, HT, generator=g, dtype=dtype)
    w = torch.randn(V, HT, generator=g, dtype=dtype)
    w[ids[: max(1, dv // 2)]] *= 2.5  # about half the target argmaxes fall in the draft vocab
    return draft, (input_ids, attention_mask, loss_mask, aux, final_hidden, w)


def naive_ttt(draft, input_ids, attention_mask, loss_mask, aux, final_hidden, w, steps):
    """Spelled out: full-vocab logits, dense-mask attention, index arithmetic by loops."""
    full = final_hidden @ w.T
    teacher = full[..., draft.t2d]
    in_draft = draft.t2d[full.argmax(-1)]
    n_valid = attention_mask.sum(1).tolist()
    h = draft.project(aux)
    ks, vs, losses, corrects, counts, chain, chain_base = [], [], [], [], [], [], []
    alive = torch.ones(B, L, dtype=torch.bool)  # right at every step so far
    for k in range(steps):
        ids_k = torch.zeros_like(input_ids)
        teacher_k = torch.zeros_like(teacher)
        sup = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            for t in range(L):
                if t + 1 + k < L:
                    ids_k[b, t] = input_ids[b, t + 1 + k]
                    teacher_k[b, t] = teacher[b, t + 1 + k]
                if t + 2 + k < n_valid[b]:
                    sup[b, t] = bool(loss_mask[b, t + 2 + k]) and bool(in_draft[b, t + 1 + k])
        cos, sin = draft.rotary(torch.arange(L)[None] + k)
        q, kk, vv = draft.midlayer.qkv(draft.embed_tokens(ids_k), h, cos, sin)
        ks.append(kk)
        vs.append(vv)
        out = draft.midlayer.finish(h, ttt_attention(q, ks, vs, impl="reference"))
        logits = draft.logits(out)
        ce = -(torch.softmax(teacher_k, -1) * torch.log_softmax(logits, -1)).sum(-1)
        losses.append(ce[sup].sum())
        right = (logits.argmax(-1) == teacher_k.argmax(-1)) & sup
        corrects.append(right.sum())
        counts.append(sup.sum())
        chain_base.append((alive & sup).sum())
        alive = alive & right
        chain.append(alive.sum())
        h = out
    return torch.stack(losses), torch.stack(corrects), torch.stack(counts), torch.stack(chain), torch.stack(chain_base)


def _grads(draft, loss):
    draft.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}


def test_matches_naive_float64():
    draft, batch = _setup()
    out = ttt_forward(draft, *batch, steps=7, loss_chunk=7)
    loss_sum, correct, count, chain, chain_base = naive_ttt(draft, *batch, steps=7)
    assert out.count.tolist() == count.tolist()
    assert 0 < out.count[0] < B * L and out.count[-1] > 0
    assert out.correct.tolist() == correct.tolist()
    assert out.chain.tolist() == chain.tolist() and out.chain_base.tolist() == chain_base.tolist()
    assert torch.allclose(out.loss_sum, loss_sum, rtol=1e-10)
    g = _grads(draft, ttt_objective(out))
    ref = _grads(draft, (loss_sum * 0.8 ** torch.arange(7, dtype=torch.float64) / count.clamp(min=1)).sum())
    for n in ref:
        assert torch.allclose(g[n], ref[n], rtol=1e-8, atol=1e-10), n
    assert set(g) == set(ref) and "embed_tokens.weight" not in g


def test_chain_counts_match_naive():
    """With 3 draft tokens a random draft is often right, so chains run several steps deep."""
    draft, batch = _setup(dv=3, seed=2)
    batch[-1][draft.t2d] *= 10  # the target's top token is nearly always a draft token
    out = ttt_forward(draft, *batch, steps=4)
    _, correct, _, chain, chain_base = naive_ttt(draft, *batch, steps=4)
    assert out.chain.tolist() == chain.tolist() and out.chain_base.tolist() == chain_base.tolist()
    assert chain[2] > 0 and (chain[1:] < correct[1:]).all()  # deep chains, and hits after a miss excluded


@pytest.mark.parametrize("attention", ["efficient", "blockwise"])
def test_attention_paths_agree_float32(attention):
    draft, batch = _setup(torch.float32)
    ref_out = ttt_forward(draft, *batch, attention="reference")
    ref = _grads(draft, ttt_objective(ref_out))
    out = ttt_forward(draft, *batch, attention=attention)
    g = _grads(draft, ttt_objective(out))
    assert torch.allclose(out.loss_sum, ref_out.loss_sum, rtol=1e-5)
    assert out.correct.tolist() == ref_out.correct.tolist()
    for n in ref:
        assert torch.allclose(g[n], ref[n], rtol=1e-4, atol=1e-5), n


def test_bf16_autocast_close_to_reference():
    draft, batch = _setup(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = ttt_forward(draft, *batch, attention="reference")
    ref = _grads(draft, ttt_objective(ref_out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ttt_forward(draft, *batch, attention="efficient")
    g = _grads(draft, ttt_objective(out))
    assert torch.allclose(out.loss_sum, ref_out.loss_sum, rtol=3e-2)
    for n in ref:
        assert (g[n] - ref[n]).norm() <= 0.1 * ref[n].norm(), n


def test_checkpointing_gives_identical_grads():
    draft, batch = _setup(torch.float32)
    a = ttt_forward(draft, *batch, checkpoint=False)
    ga = _grads(draft, ttt_objective(a))
    b = ttt_forward(draft, *batch, checkpoint=True)
    gb = _grads(draft, ttt_objective(b))
    assert torch.equal(a.loss_sum, b.loss_sum)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_right_padding_content_is_ignored():
    draft, batch = _setup()
    input_ids, attention_mask, loss_mask, aux, final_hidden, w = batch
    pad = ~attention_mask.bool()
    out = ttt_forward(draft, *batch)
    ga = _grads(draft, ttt_objective(out))
    input_ids = input_ids.masked_fill(pad, 7)
    aux = aux.masked_fill(pad[..., None], 123.0)
    final_hidden = final_hidden.masked_fill(pad[..., None], -5.0)
    out2 = ttt_forward(draft, input_ids, attention_mask, loss_mask, aux, final_hidden, w)
    gb = _grads(draft, ttt_objective(out2))
    assert torch.allclose(out.loss_sum, out2.loss_sum, rtol=1e-12)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-9, atol=1e-12), n


def test_metrics_and_no_grad_eval():
    draft, batch = _setup(torch.float32)
    with torch.no_grad():
        out = ttt_forward(draft, *batch, steps=3)
    m = out.metrics()
    steps = ("0", "1", "2")
    assert set(m) == {f"{k}_{i}" for k in ("acc", "loss", "cacc") for i in steps} | {"sim_tau", "cond_tau"}
    acc = out.correct.double() / out.count.double()
    cacc = out.chain.double() / out.chain_base.double().clamp(min=1)
    assert m["sim_tau"] == pytest.approx(1 + float(acc.cumprod(0).sum()))
    assert m["cond_tau"] == pytest.approx(1 + float(cacc.cumprod(0).sum()))
    assert m["loss_1"] == pytest.approx(float(out.loss_sum[1] / out.count[1]))


def test_sim_tau_multiplies_the_step_agreements():
    """A chain's k-th draft token is accepted only if every earlier one was: 1 + sum_k prod_{j<=k} acc_j."""
    m = ttt_metrics(torch.tensor([3, 2, 1]), torch.tensor([4, 4, 2]), torch.tensor([2.0, 4.0, 1.0]))
    assert [m["acc_0"], m["acc_1"], m["acc_2"]] == [0.75, 0.5, 0.5]
    assert [m["loss_0"], m["loss_1"], m["loss_2"]] == [0.5, 1.0, 0.5]
    assert m["sim_tau"] == pytest.approx(1 + 0.75 + 0.375 + 0.1875)
