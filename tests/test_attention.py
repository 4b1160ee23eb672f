"""The efficient TTT attention paths against the dense-mask oracle, forward and backward."""

import pytest
import torch

from draftforge.draft.attention import ttt_attention, ttt_mask

B, HQ, HKV, L, D = 3, 6, 2, 24, 16
LENGTHS = [24, 17, 5]  # ragged, right padded

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _inputs(steps: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    q = r(B, HQ, L, D)
    ks = [r(B, HKV, L, D) for _ in range(steps)]
    vs = [r(B, HKV, L, D) for _ in range(steps)]
    return q, ks, vs


def _valid(device: torch.device | None = None) -> torch.Tensor:
    return (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None])[:, None, :, None].to(device)  # [B,1,L,1]


def _out_and_grads(q, ks, vs, impl, upcast=False):
    leaves = [x.detach().clone().requires_grad_() for x in [q, *ks, *vs]]
    if upcast:
        leaves = [x.detach().double().requires_grad_() for x in leaves]
    n = len(ks)
    out = ttt_attention(leaves[0], leaves[1 : n + 1], leaves[n + 1 :], impl=impl)
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(out.dtype)
    loss = (out * w * _valid(out.device)).sum()
    loss.backward()
    return out.detach().double() * _valid(out.device), [x.grad.double() for x in leaves]


@pytest.mark.parametrize("impl", ["efficient", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", range(7))
def test_matches_reference(impl, dtype, k):
    q, ks, vs = _inputs(k + 1, dtype, seed=k)
    out, grads = _out_and_grads(q, ks, vs, impl)
    # oracle: dense reference, in float64 on the same (possibly rounded) inputs
    ref_out, ref_grads = _out_and_grads(q, ks, vs, "reference", upcast=True)
    tol = TOL[dtype]
    scale = max(1.0, ref_out.abs().max().item())
    assert (out - ref_out).abs().max().item() <= tol * scale
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        err = (g - rg).abs().max().item()
        assert err <= tol * max(1.0, rg.abs().max().item()), f"grad {i}: {err}"


@pytest.mark.parametrize("impl", ["efficient", "blockwise"])
def test_gradcheck_float64(impl):
    torch.manual_seed(0)
    n = 3
    q = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    kv = [torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2 * n)]
    f = lambda q, *kv: ttt_attention(q, list(kv[:n]), list(kv[n:]), impl=impl)
    assert torch.autograd.gradcheck(f, (q, *kv), fast_mode=True)


def test_reference_mask_shape():
    m = ttt_mask(4, 3)
    assert m.shape == (4, 12)
    assert m[2, :4].tolist() == [True, True, True, False]
    assert m[2, 4:8].tolist() == [False, False, True, False]
    assert m[:, 8:].equal(torch.eye(4, dtype=torch.bool))


def test_reference_bf16_is_close_to_float64():
    """Sanity for the tolerance: bf16 reference itself is within the bf16 tolerance of float64."""
    q, ks, vs = _inputs(3, torch.bfloat16)
    out, _ = _out_and_grads(q, ks, vs, "reference")
    ref, _ = _out_and_grads(q, ks, vs, "reference", upcast=True)
    assert (out - ref).abs().max().item() <= TOL[torch.bfloat16] * max(1.0, ref.abs().max().item())


CUDA = torch.cuda.is_available()


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 6])
@pytest.mark.parametrize("length", [L, 200])  # 200: past flex's 128-token blocks
def test_flex_forward_matches_reference(dtype, k, length):
    """Forward only on CPU (flex's eager implementation); its fused kernel and backward need CUDA."""
    g = torch.Generator().manual_seed(k)
    q = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64).to(dtype)
    ks = [torch.randn(B, HKV, length, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(k + 1)]
    vs = [torch.randn(B, HKV, length, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(k + 1)]
    out = ttt_attention(q, ks, vs, impl="flex").double()
    ref = ttt_attention(q.double(), [x.double() for x in ks], [x.double() for x in vs], impl="reference")
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.skipif(not CUDA, reason="flex attention's compiled kernel and backward run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 3])
def test_flex_matches_reference_on_cuda(dtype, k):
    q, ks, vs = _inputs(k + 1, dtype, seed=k)
    q, ks, vs = q.detach().cuda(), [x.detach().cuda() for x in ks], [x.detach().cuda() for x in vs]
    out, grads = _out_and_grads(q, ks, vs, "flex")
    ref_out, ref_grads = _out_and_grads(q, ks, vs, "reference", upcast=True)
    tol = TOL[dtype]
    assert (out - ref_out).abs().max().item() <= tol * max(1.0, ref_out.abs().max().item())
    for i, (gr, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        err = (gr - rg).abs().max().item()
        assert err <= tol * max(1.0, rg.abs().max().item()), f"grad {i}: {err}"
