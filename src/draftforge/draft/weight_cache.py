"""`WeightCache`: a value derived from some weights, kept per owner until one of them changes.

Decoding reuses copies of weights in another layout (the EAGLE-3 layer's q/k/v halves, `draft/model.py`;
oneDNN's packed linears, `decode/packed.py`). A copy is remade when a weight is replaced (its storage
moves) or changed in place (its version counter moves), and dropped with its owner.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


class WeightCache(Generic[T]):
    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary[object, tuple[tuple, T]] = weakref.WeakKeyDictionary()

    def get(self, owner: object, weights: Sequence[Tensor], make: Callable[[], T]) -> T:
        """`owner`'s value made from `weights`: the kept one while they are unchanged, else `make()`."""
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        hit = self._kept.get(owner)
        if hit is None or hit[0] != key:
            hit = key, make()
            self._kept[owner] = hit
        return hit[1]
