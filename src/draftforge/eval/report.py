"""Results of `draftforge eval` (and `bench`, same schema): a JSON file, a terminal table, a PNG chart.

JSON: {"meta": {...}, "results": {suite: {"batch,steps,topk,draft_tokens": {...}}}} where each entry
holds at least batch, steps, topk, draft_tokens, num_prompts, accept_length (τ), acceptance
([α_1..α_steps]), throughput (tokens/s), latency (s per request batch) and, when a plain
baseline ran in the same process, plain_throughput and speedup.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, Any]]]


def write_json(path: str | Path, meta: dict[str, Any], results: Results) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_json(path: str | Path) -> tuple[dict[str, Any], Results]:
    data = json.loads(Path(path).read_text())
    return data.get("meta", {}), data["results"]


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: Results) -> str:
    """One line per suite and config: τ, α_1..α_k, the share of answer tokens in the draft vocabulary,
    prompt lookup's τ on the same prompts and its tokens per target forward (the figure comparable with
    the draft's τ, eval/ngram.py), tokens/s plain and speculative, speedup."""
    head = ["suite", "config", "prompts", "tau", "alpha_k", "in vocab", "n-gram tau", "n-gram tok/fwd", "plain tok/s",
            "spec tok/s", "speedup", "latency s"]
    rows = [head]
    for suite, by_cfg in results.items():
        for key, r in by_cfg.items():
            alpha = " ".join(_fmt(a, ".2f") for a in r.get("acceptance") or [])
            lookup = r.get("ngram") or {}
            rows.append([
                suite, key, str(r.get("num_prompts", "")), _fmt(r.get("accept_length"), ".2f"), alpha or "-",
                _fmt(r.get("vocab_coverage"), ".1%"),
                _fmt(lookup.get("accept_length"), ".2f"), _fmt(lookup.get("tokens_per_forward"), ".2f"),
                _fmt(r.get("plain_throughput"), ".1f"),
                _fmt(r.get("throughput"), ".1f"), _fmt(r.get("speedup"), ".2f"), _fmt(r.get("latency"), ".2f"),
            ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: Results, path: str | Path, title: str = "") -> Path | None:
    """α_k per position (left) and τ (right) for every suite/config; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    path = Path(path)
    fig, (ax_a, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, taus = [], []
    for suite, by_cfg in results.items():
        for key, r in by_cfg.items():
            label = f"{suite} [{key}]"
            alpha = [a for a in (r.get("acceptance") or [])]
            ks = [k + 1 for k, a in enumerate(alpha) if a is not None]
            if ks:
                ax_a.plot(ks, [alpha[k - 1] for k in ks], marker="o", label=label)
            labels.append(label)
            taus.append(r.get("accept_length") or 0.0)
    ax_a.set_xlabel("draft position k")
    ax_a.set_ylabel("α_k = P(token k accepted | k-1 accepted)")
    ax_a.set_ylim(0, 1.02)
    ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_a.grid(alpha=0.3)
    if labels:
        ax_a.legend(fontsize=7)
    bars = ax_t.barh(range(len(taus)), taus, color="tab:blue")
    ax_t.set_yticks(range(len(labels)), labels, fontsize=7)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("τ (tokens per draft-and-verify cycle)")
    for bar, tau in zip(bars, taus, strict=True):
        ax_t.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {tau:.2f}", va="center", fontsize=7)
    ax_t.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
