"""Decoding runs every float32 `nn.Linear` on a oneDNN copy of its weight packed once, as vLLM-cpu does.

A decode step multiplies a few rows by every weight of the model, so it reads the weights once per
step. `F.linear` on CPU calls MKL's gemm, which repacks the weight on every call and whose small-M
kernels are slow on this machine: with SmolLM2's shapes, 4 rows (a chain verification) cost 1.4-2x
one row, and one row runs at about 60 % of what the packed path reaches. oneDNN's linear on a
reordered weight costs about the same for 1 to 8 rows, and each row's result does not depend on how
many rows came with it, so plain decoding and verification compute the same logits for the same
prefix (greedy equality then rests on attention alone).

`packed_linears(*modules)` installs the packed forwards for the duration of a `with` block and removes
them after, so the modules are unchanged outside decoding (training, hooks, other dtypes). A linear is
packed at its first call, so one that a forward never calls (`fused_linears` stands for it) costs
nothing. The packed copies are kept while their module lives (memory: one more copy of the float32
weights); a weight changed in place or replaced is packed again on the next entry.

`fused_linears(owner, linears)` is one linear computing several that read the same input (q, k and v;
gate and up): one call and one pass over the input instead of three or two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftforge.draft.weight_cache import WeightCache

PACK_ROWS = 4  # oneDNN's hint for the rows per call: a chain of 3 verified, and fast for 1 to 8 rows
_packs: WeightCache[Tensor] = WeightCache()
_fused: WeightCache[Callable[[Tensor], Tensor]] = WeightCache()


def _packable(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available())


def _packed(m: nn.Linear) -> Tensor:
    return _packs.get(m, [m.weight], lambda: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), PACK_ROWS))


def _forward(packed: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack_at_first_call(m: nn.Linear) -> Callable[[Tensor], Tensor]:
    def first(x: Tensor) -> Tensor:
        m.forward = partial(_forward, _packed(m), m.bias)
        return m.forward(x)

    return first


def fused_linears(owner: nn.Module, linears: Sequence[nn.Linear]) -> Callable[[Tensor], Tensor]:
    """x -> the concatenation of each linear's output, from one weight (packed when packable), kept per owner."""
    weights = [t for m in linears for t in (m.weight, m.bias) if t is not None]
    return _fused.get(owner, weights, lambda: _fuse(linears))


def _fuse(linears: Sequence[nn.Linear]) -> Callable[[Tensor], Tensor]:
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach() for m in linears])
    if all(_packable(m) for m in linears):
        return partial(_forward, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS), bias)
    return partial(F.linear, weight=weight, bias=bias)


@contextmanager
def packed_linears(*modules: nn.Module) -> Iterator[None]:
    """Within the block, every packable linear of `modules` runs on its packed weight (no autograd).
    Blocks nest: an inner one leaves the linears an outer one installed to it."""
    mine = {id(m): m for root in modules for m in root.modules() if _packable(m) and "forward" not in vars(m)}
    for m in mine.values():
        m.forward = _pack_at_first_call(m)  # an instance attribute shadows Linear.forward
    try:
        yield
    finally:
        for m in mine.values():
            del m.forward
