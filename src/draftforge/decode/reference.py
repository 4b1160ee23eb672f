"""The smallest EAGLE-3 speculative decoder: batch 1, chain only, greedy, in the shape of gpt-fast's
`speculative_decode`. No cache: every forward reruns the whole sequence. It is a test oracle only
(tests/test_speculate.py): `SpeculativeDecoder` must emit the same tokens and accept the same count
every cycle, so its masks, positions and cache surgery are checked against code with none of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from draftforge.draft.model import Eagle3Draft


def target_forward(target: nn.Module, taps: list[int], seq: list[int]) -> tuple[Tensor, Tensor]:
    """(logits [N, V], aux [N, len(taps) * H]): the taps are HF hidden_states indices (inputs of layers)."""
    out = target(torch.tensor([seq]), output_hidden_states=True)
    return out.logits[0], torch.cat([out.hidden_states[i][0] for i in taps], dim=-1)


def draft_chain(draft: Eagle3Draft, seq: list[int], aux: Tensor, k: int) -> list[int]:
    """k greedy draft tokens after seq. Index t holds (x[t+1], aux[t]); a drafted token is fed at the next
    index with the draft's own output at the previous one in place of aux (TTT, docs/design.md section 5)."""
    ids, hidden = torch.tensor(seq[1:]), draft.project(aux[:-1].to(next(draft.parameters()).dtype))
    drafted = []
    for _ in range(k):
        pre, _ = draft.step(ids[None], hidden[None], torch.arange(len(ids))[None])  # causal, no cache
        tok = draft.to_target_ids(draft.logits(pre[0, -1]).argmax(-1))
        drafted.append(int(tok))
        ids, hidden = torch.cat([ids, tok[None]]), torch.cat([hidden, pre[0, -1:]])
    return drafted


def speculative_decode(target: nn.Module, draft: Eagle3Draft, seq: list[int], k: int) -> tuple[list[int], int]:
    """One cycle after the committed tokens seq: (new tokens, drafted tokens accepted)."""
    taps = draft.config.aux_layer_ids
    drafted = draft_chain(draft, seq, target_forward(target, taps, seq)[1], k)
    want = target_forward(target, taps, seq + drafted)[0][len(seq) - 1 :].argmax(-1).tolist()  # k + 1 tokens
    n = 0
    while n < k and drafted[n] == want[n]:
        n += 1
    return drafted[:n] + [want[n]], n


@torch.no_grad()
def generate(target: nn.Module, draft: Eagle3Draft, prompt: list[int], k: int,
             max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(max_new_tokens new tokens, the accepted count of every cycle)."""
    seq = list(prompt) + [int(target_forward(target, draft.config.aux_layer_ids, list(prompt))[0][-1].argmax())]
    accepted = []
    while len(seq) - len(prompt) < max_new_tokens:
        new, n = speculative_decode(target, draft, seq, k)
        seq += new
        accepted.append(n)
    return seq[len(prompt) :][:max_new_tokens], accepted
