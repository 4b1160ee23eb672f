"""Held-out acceptance against minutes of training: what an hour buys.

Read from runs that exist (each held-out evaluation of a run is a point):

    python benchmarks/tau_per_minute.py --run "60-min recipe=runs/bundle/smollm2-135m-hour/train" \\
        --run "demo recipe=runs/demo/train"

or trained here, one run per budget (`--budgets`), the honest curve: a point in the middle of a run sits
below what a run sized to that budget reaches, since its learning rate has not decayed yet.

    python benchmarks/tau_per_minute.py --budgets 5,10,20,40,60 --label "hour recipe" \\
        --config recipes/smollm2-135m-hour.yaml --work runs/tau_budgets [overrides ...]

The budget runs share their start: the longest trains with warmup-stable-decay (`train.schedule=wsd`)
for its time budget, keeping a checkpoint every `--save-every` steps; each shorter budget gets the same
step time's worth of steps and branches from the longest run's last checkpoint before its own decay
(`draftforge train --branch-from`), which is exactly the run of its length. Five budgets up to an hour
cost about 60 + 0.2 x 75 minutes instead of 135.

A recipe that trains offline (`features.store=DIR`) is captured first (`draftforge capture`, skipped where
the store is complete) and its points add the store's recorded capture time: an offline hour is capture
plus training, like an online one.

Minutes are tokens / the run's wall-clock tok/s, so the target (online or in capture) and evaluations count
as training time. Compare runs only on the same held-out split (same data, data.eval_fraction and seed).
Writes benchmarks/results/tau_per_minute.json and .png, keeping the series of other labels already there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from draftforge.config import load_config
from draftforge.features.store import FeatureStore
from draftforge.train.checkpoint import list_checkpoints, trainer_state
from draftforge.train.optim import wsd_decay_start
from draftforge.train.tracking import read_metrics

RESULTS = Path(__file__).parent / "results" / "tau_per_minute.json"


def capture_minutes(run_dir: Path) -> float:
    """What the run's feature store cost to capture (0 for a run with the target online)."""
    checkpoints = list_checkpoints(run_dir)
    store = trainer_state(checkpoints[-1])["config"].get("features.store") if checkpoints else None
    return FeatureStore(store).capture_minutes if store else 0.0


def curve(run_dir: Path) -> list[dict[str, float]]:
    """(minutes, held-out cond τ, acc_0) at each evaluation logged in run_dir/metrics.jsonl; minutes
    include the capture of the run's feature store."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no such file (pass a run's train.out_dir)")
    offset = capture_minutes(run_dir)
    rows = read_metrics(path)
    rate = {row["step"]: row["tok_per_s"] for row in rows if "tok_per_s" in row}
    points = []
    for row in rows:
        if "eval_cond_tau" not in row:
            continue
        if row["step"] not in rate:
            raise SystemExit(f"{path}: the evaluation at step {row['step']} has no training row beside it")
        minutes = offset + row["tokens"] / rate[row["step"]] / 60
        points.append({"step": row["step"], "minutes": round(minutes, 2), "capture_minutes": round(offset, 2),
                       "tokens": row["tokens"], "cond_tau": round(row["eval_cond_tau"], 4),
                       "acc_0": round(row["eval_acc_0"], 4)})
    if not points:
        raise SystemExit(f"{path}: no held-out evaluations logged (train.eval_every was 0?)")
    return points


def budget_curve(config: str | None, overrides: list[str], budgets: list[float], work: Path,
                 save_every: int) -> list[dict[str, float]]:
    """One WSD run for the longest budget, the shorter ones branched from its checkpoints; a point per
    budget at the end of its own decay (its final held-out evaluation)."""
    from draftforge.features.capture import capture
    from draftforge.train.command import train

    recipe = load_config(config, overrides)
    if recipe.features.store:
        print(capture(recipe))

    def run(name: str, extra: list[str], branch_from: Path | None = None) -> Path:
        cfg = load_config(config, [*overrides, "train.schedule=wsd", "train.eval_every=1000000000",
                                   f"train.out_dir={work / name}", *extra])
        train(cfg, branch_from=str(branch_from) if branch_from else None)
        return work / name

    longest, *shorter = sorted(budgets, reverse=True)
    long = run(f"{longest:g}min", ["train.max_steps=100000000", f"train.budget_minutes={longest:g}",
                                   f"train.save_every={save_every}", "train.keep_last=0"])
    checkpoints = list_checkpoints(long)
    state = trainer_state(checkpoints[-1])  # the length the budget fixed, and the settings it ran with
    total, recorded = state["total_steps"], state["config"]
    dirs = {longest: long}
    for minutes in shorter:
        steps = max(1, round(total * minutes / longest))
        start = wsd_decay_start(steps, recorded["train.warmup_steps"], recorded["train.decay_fraction"])
        before = [c for c in checkpoints if int(c.name.removeprefix("step_")) < start]
        dirs[minutes] = run(f"{minutes:g}min", [f"train.max_steps={steps}", "train.budget_minutes=null"],
                            before[-1] if before else None)
    points = []
    for minutes in sorted(dirs):
        final = curve(dirs[minutes])[-1]
        points.append({"budget_minutes": minutes, **final})
    return points


def plot(series: dict[str, list[dict[str, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for label, points in series.items():
        ax.plot([p["minutes"] for p in points], [p["cond_tau"] for p in points], marker="o", label=label)
    ax.set_xlabel("minutes on this 2-core CPU (target, capture and evaluations included)")
    ax.set_ylabel("held-out cond τ (3-step chain)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")  # the curves rise to the upper left: the corner stays clear
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=DIR",
                        help="a run's label and its train.out_dir (repeat for several runs)")
    parser.add_argument("--budgets", type=lambda v: [float(x) for x in v.split(",")], metavar="M,M,...",
                        help="train one run per time budget (minutes) from --config, branched from the longest")
    parser.add_argument("--label", default="budget runs", help="with --budgets: the curve's label")
    parser.add_argument("--config", help="with --budgets: the recipe")
    parser.add_argument("--work", type=Path, default=Path("runs/tau_budgets"), help="with --budgets: run dirs")
    parser.add_argument("--save-every", type=int, default=20,
                        help="with --budgets: the longest run's checkpoint spacing (a branch recomputes up to this)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path; the PNG goes beside it")
    parser.add_argument("overrides", nargs="*", help="with --budgets: dotted config overrides")
    args = parser.parse_args()
    if not args.run and not args.budgets:
        parser.error("give --run LABEL=DIR (read runs) or --budgets M,M,... (train them)")
    series: dict[str, list[dict[str, float]]] = json.loads(args.out.read_text())["series"] if args.out.exists() else {}
    for item in args.run:
        label, sep, run_dir = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {item!r}: expected LABEL=DIR")
        series[label] = curve(Path(run_dir))
    if args.budgets:
        series[args.label] = budget_curve(args.config, args.overrides, args.budgets, args.work, args.save_every)
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
