"""Training curves from metrics.jsonl: what a user looks at to see whether the draft is learning."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_tau_curve(metrics_path: str | Path, png: str | Path) -> Path:
    """Simulated acceptance length (train, and eval where measured) against tokens trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["tokens"], r["sim_tau"]) for r in records if "sim_tau" in r]
    evals = [(r["tokens"], r["eval_sim_tau"]) for r in records if "eval_sim_tau" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        ax.plot([t for t, _ in train], [v for _, v in train], label="train (per logged step)", alpha=0.6)
    if evals:
        ax.plot([t for t, _ in evals], [v for _, v in evals], "o-", label="held-out eval")
    ax.set_xlabel("target tokens trained")
    ax.set_ylabel("simulated acceptance length τ")
    ax.set_title("EAGLE-3 draft: simulated τ = 1 + Σ_k Π_{j≤k} acc_j")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
