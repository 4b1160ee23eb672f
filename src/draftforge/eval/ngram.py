"""The free baseline every draft must beat: n-gram prompt lookup (vLLM's `method: "ngram"`).

At temperature 0 a speculative decoder emits exactly the greedy tokens, so the acceptance prompt
lookup would get on the same prompts follows from those tokens alone, without running it: propose
the tokens that followed the earliest earlier occurrence of the longest suffix n-gram (n in
[min_n, max_n]), accept the prefix that equals what greedy decoding produced, advance past it and
the bonus token. Cycles without a proposal do not count, as in vLLM's counters (τ = 1 +
accepted / drafts).

So lookup's τ is acceptance *when it proposes*, and it proposes in a minority of steps. The figure
comparable with a draft's τ (a draft proposes at every step) is tokens per target forward, counting
the steps where lookup found nothing and the target emitted one token alone: `per_forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NGRAM = (2, 5)  # default (min_n, max_n) of the baseline: vLLM's prompt_lookup_min / prompt_lookup_max


def propose(context: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens after the earliest earlier match of the context's longest suffix n-gram."""
    context = list(context)
    size = len(context)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = context[size - n :]
        for i in range(size - n):  # occurrences ending before the last token (the suffix itself excluded)
            if context[i] == suffix[0] and context[i : i + n] == suffix:
                return context[i + n : i + n + k]
    return []


@dataclass
class LookupStats:
    """vLLM-style counters of prompt lookup: drafts proposed, and tokens accepted per draft position."""

    k: int
    min_n: int
    max_n: int
    drafts: int = 0
    accepted: list[int] = field(default_factory=list)
    forwards: int = 0  # decode steps of the target, with or without a proposal
    tokens: int = 0  # tokens those steps emitted

    def __post_init__(self) -> None:
        self.accepted = self.accepted or [0] * self.k

    def add(self, prompt: Sequence[int], output: Sequence[int], emitted: int | None = None) -> None:
        """Replay one greedy answer: the first token comes from prefill, then draft-and-verify cycles
        until `emitted` tokens (default all of `output`). An engine verifies a last draft against the
        target's continuation past the answer's end and counts what it accepts there: pass `output`
        longer than `emitted` to count that too (without it, τ can come out a little lower)."""
        tokens, pos = list(prompt) + list(output), len(prompt) + 1
        end = len(prompt) + (len(output) if emitted is None else emitted)
        self.tokens += max(0, end - pos)
        while pos < end:
            self.forwards += 1
            draft = propose(tokens[:pos], self.k, self.min_n, self.max_n)
            hit = 0
            while hit < len(draft) and pos + hit < len(tokens) and draft[hit] == tokens[pos + hit]:
                hit += 1
            if draft:
                self.drafts += 1
                for i in range(hit):
                    self.accepted[i] += 1
            pos += hit + 1

    @property
    def tau(self) -> float:
        return 1.0 + sum(self.accepted) / max(1, self.drafts)

    @property
    def per_forward(self) -> float:
        """Tokens per decode step of the target: what lookup buys, comparable with a draft's τ."""
        return self.tokens / self.forwards if self.forwards else 1.0

    def summary(self) -> dict[str, object]:
        """τ and α_k (token k accepted given tokens < k accepted) for a results JSON, and per_forward."""
        alpha = [a / p if p else None for a, p in zip(self.accepted, [self.drafts, *self.accepted[:-1]], strict=True)]
        return {"accept_length": self.tau, "acceptance": alpha, "drafts": self.drafts, "k": self.k,
                "min_n": self.min_n, "max_n": self.max_n, "forwards": self.forwards,
                "tokens_per_forward": self.per_forward}
