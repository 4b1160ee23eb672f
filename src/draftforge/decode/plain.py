"""Plain decoding, token by token: the baseline for speed and for greedy equality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from draftforge.decode.acceptance import pick
from draftforge.decode.packed import packed_linears
from draftforge.decode.target_runner import TargetRunner, left_pad, select_rows_cache, slot_cache


def plain_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, decoded with an in-place KV cache (`slot_cache`).

    Prompts of one length need no mask (the fastest path). Ragged prompts are left padded and get our
    4D masks, in which every query sees itself (see `left_pad`). The target runs as the speculative
    decoders run it (`TargetRunner`), its linears on packed weights (`packed.py`).
    """
    with torch.no_grad(), packed_linears(model):
        return _plain(model, prompts, max_new_tokens, temperature, eos_token_ids, generator)


def _plain(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           eos_token_ids: Sequence[int], generator: torch.Generator | None) -> list[list[int]]:
    runner = TargetRunner(model, [])
    ids, valid, pos, attend = left_pad(prompts, runner.device)
    B = ids.shape[0]
    padded = not bool(valid.all())
    cache = slot_cache()
    logits, _ = runner.forward(ids, pos, cache, attend if padded else None, pos, logits_to_keep=1)
    outs: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(B, device=ids.device)
    eos = set(eos_token_ids)
    while True:
        tok = pick(logits[:, -1], temperature, generator)
        live = []
        for b, t in enumerate(tok.tolist()):
            row = outs[int(rows[b])]
            row.append(t)
            live.append(not (t in eos or len(row) >= max_new_tokens))
        if not any(live):
            return outs
        if not all(live):
            keep = torch.tensor(live, device=ids.device).nonzero()[:, 0]
            select_rows_cache(cache, keep)
            rows, tok, valid, pos = rows[keep], tok[keep], valid[keep], pos[keep]
        q_pos = pos[:, -1:] + 1
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        pos = torch.cat([pos, q_pos], dim=1)
        logits, _ = runner.forward(tok[:, None], q_pos, cache, valid[:, None, :] if padded else None, pos)


def eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer names."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    return sorted(i for i in ids if i is not None)
