"""What a decoding run is asked for (`SpecConfig`) and what it gives back (`SpecOutput`, `SpecStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SpecConfig:
    """(batch, steps, topk, draft_tokens) as SGLang names them; steps == 0 means no speculation."""

    batch: int = 1
    steps: int = 3
    topk: int = 1
    draft_tokens: int = 4

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.steps == 0:
            return
        if self.steps < 0 or self.topk < 1:
            raise ValueError(f"steps >= 0 and topk >= 1 required, got {self}")
        if not 2 <= self.draft_tokens <= 1 + self.max_nodes:
            raise ValueError(
                f"draft_tokens={self.draft_tokens} must be in [2, {1 + self.max_nodes}] for steps={self.steps}, "
                f"topk={self.topk} (root + at most topk + (steps-1)*topk^2 drafted nodes)"
            )

    @property
    def max_nodes(self) -> int:
        return self.topk + (self.steps - 1) * self.topk**2

    @property
    def key(self) -> str:
        return f"{self.batch},{self.steps},{self.topk},{self.draft_tokens}"

    @classmethod
    def parse(cls, text: str) -> SpecConfig:
        parts = [int(p) for p in text.replace(" ", "").split(",")]
        if len(parts) != 4:
            raise ValueError(f"config {text!r} is not batch,steps,topk,draft_tokens")
        return cls(*parts)


@dataclass
class SpecStats:
    """Per-cycle acceptance: τ = mean(accepted + 1); α_k = P(depth k accepted | depth k-1 accepted)."""

    steps: int
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted, one entry per row-cycle
    draft_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        return (sum(self.accepted) + len(self.accepted)) / max(1, len(self.accepted))

    @property
    def alpha(self) -> list[float]:
        out = []
        for k in range(1, self.steps + 1):
            tried = sum(n >= k - 1 for n in self.accepted)
            out.append(sum(n >= k for n in self.accepted) / tried if tried else float("nan"))
        return out

    @property
    def position_rate(self) -> list[float]:
        """Unconditional P(depth k accepted) per cycle: what vLLM's per-position acceptance counters give."""
        return [sum(n >= k for n in self.accepted) / max(1, self.cycles) for k in range(1, self.steps + 1)]

    def merge(self, other: SpecStats) -> None:
        self.accepted += other.accepted
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        self.commit_s += other.commit_s


@dataclass
class SpecOutput:
    tokens: list[list[int]]  # new tokens per prompt (eos included when hit)
    stats: SpecStats
