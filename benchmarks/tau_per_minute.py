"""Held-out acceptance against minutes of training, read from runs' metrics.jsonl: what an hour buys.

    python benchmarks/tau_per_minute.py --run "60-min recipe=runs/bundle/smollm2-135m-hour/train" \\
        --run "demo recipe=runs/demo/train"

Every held-out evaluation of a run is a point: its cond τ (1 + Σ_k Π_{j≤k} cacc_j, what a chain draft's
acceptance is made of) at minutes = tokens / the run's wall-clock tok/s at that step, so capture (the
target runs online) and the evaluations themselves count as training time. A point in the middle of a
run sits below what a run sized to that budget would reach: its learning rate has not decayed yet.
Compare runs only on the same held-out split (same data, data.eval_fraction and seed).
Writes benchmarks/results/tau_per_minute.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from draftforge.train.tracking import read_metrics

RESULTS = Path(__file__).parent / "results" / "tau_per_minute.json"


def curve(run_dir: Path) -> list[dict[str, float]]:
    """(minutes, held-out cond τ, acc_0) at each evaluation logged in run_dir/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no such file (pass a run's train.out_dir)")
    rows = read_metrics(path)
    rate = {row["step"]: row["tok_per_s"] for row in rows if "tok_per_s" in row}
    points = []
    for row in rows:
        if "eval_cond_tau" not in row:
            continue
        if row["step"] not in rate:
            raise SystemExit(f"{path}: the evaluation at step {row['step']} has no training row beside it")
        points.append({"step": row["step"], "minutes": round(row["tokens"] / rate[row["step"]] / 60, 2),
                       "tokens": row["tokens"], "cond_tau": round(row["eval_cond_tau"], 4),
                       "acc_0": round(row["eval_acc_0"], 4)})
    if not points:
        raise SystemExit(f"{path}: no held-out evaluations logged (train.eval_every was 0?)")
    return points


def plot(series: dict[str, list[dict[str, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in series.items():
        ax.plot([p["minutes"] for p in points], [p["cond_tau"] for p in points], marker="o", label=label)
    ax.set_xlabel("minutes of training on this 2-core CPU (target online, evaluations included)")
    ax.set_ylabel("held-out cond τ (3-step chain)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="a run's label and its train.out_dir (repeat for several runs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path; the PNG goes beside it")
    args = parser.parse_args()
    series: dict[str, list[dict[str, float]]] = {}
    for item in args.run:
        label, sep, run_dir = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {item!r}: expected LABEL=DIR")
        series[label] = curve(Path(run_dir))
    report: dict[str, Any] = {"hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores", "series": series}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(series, args.out.with_suffix(".png"))
    for label, points in series.items():
        print(label)
        print("  minutes  step  held-out cond τ  acc_0")
        for p in points:
            print(f"  {p['minutes']:7.1f} {p['step']:5d} {p['cond_tau']:16.3f} {p['acc_0']:6.3f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
