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
    """Simulated acceptance length (train, and eval where measured) against tokens trained: the
    chain-conditional cond_tau where logged (what acceptance is made of), else the older sim_tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    key = "cond_tau" if any("cond_tau" in r for r in records) else "sim_tau"
    train = [(r["tokens"], r[key]) for r in records if key in r]
    evals = [(r["tokens"], r[f"eval_{key}"]) for r in records if f"eval_{key}" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        ax.plot([t for t, _ in train], [v for _, v in train], label="train (per logged step)", alpha=0.6)
    if evals:
        ax.plot([t for t, _ in evals], [v for _, v in evals], "o-", label="held-out eval")
    ax.set_xlabel("target tokens trained")
    ax.set_ylabel("simulated acceptance length τ")
    ax.set_title("simulated τ = 1 + Σ_k Π_{j≤k} " + ("P(step j right | steps < j right)" if key == "cond_tau"
                                                       else "acc_j"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
