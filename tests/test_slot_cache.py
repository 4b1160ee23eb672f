"""decode/target_runner.slot_cache: appends in place into one buffer per layer, and a prefix view,
`keep_cache`'s surgery or a row selection leave it holding exactly what a DynamicCache would."""

import torch
from transformers import DynamicCache

from draftforge.decode.target_runner import keep_cache, select_rows_cache, slot_cache


def _both(*steps):
    caches = slot_cache(), DynamicCache()
    for cache in caches:
        for k in steps:
            cache.update(k, -k, 0)
    return caches


def test_appends_in_place_and_matches_a_dynamic_cache():
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 2, t, 4, generator=g) for t in (5, 1, 1, 2, 1)]
    slot, dyn = _both(steps[0])
    ptr = slot.layers[0].keys.data_ptr()
    for k in steps[1:]:
        for cache in (slot, dyn):
            cache.update(k, -k, 0)
    assert slot.layers[0].keys.data_ptr() == ptr  # no reallocation within the buffer's room
    assert slot.get_seq_length() == dyn.get_seq_length() == 10  # the prefill left room for twice its length
    index = torch.tensor([[0, 2], [1, 2], [0, 1]])  # keep 7 slots, then two of the last three per row
    rows = torch.tensor([2, 0])
    for cache in (slot, dyn):
        keep_cache(cache, 7, index)
        select_rows_cache(cache, rows)
        cache.update(steps[1][:2], -steps[1][:2], 0)
    for a, b in zip(slot.layers, dyn.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert slot.get_seq_length() == 10 and slot.layers[0].keys.data_ptr() != ptr  # rows selected: a new buffer
