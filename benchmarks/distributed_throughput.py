"""Training throughput of one process against torchrun data parallelism (gloo on CPU) on the SmolLM2 demo recipe.

Every configuration trains the same global micro-batch sequence (recipes/smollm2-135m.yaml, online target): one
process with grad_accum N and all the cores as threads, N processes with grad_accum 1 and cores / N threads each
(optionally FSDP2-sharded). They compute the same steps, so the losses must agree; only the tokens per second
differ. The rate is the steady state: tokens trained after step 1 over the time they took (read back from each
run's metrics.jsonl), so start-up, target loading and the first step are left out; wall time is shown as well.
Writes benchmarks/results/distributed_throughput.json.

    python benchmarks/distributed_throughput.py --steps 10
    python benchmarks/distributed_throughput.py --steps 3 --fsdp train.precision=fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
RESULTS = Path(__file__).parent / "results" / "distributed_throughput.json"


def command(procs: int, threads: int, accum: int, args: argparse.Namespace, out: Path, fsdp: bool) -> list[str]:
    settings = [
        f"train.max_steps={args.steps}", f"train.out_dir={out}", "train.log_every=1", "train.eval_every=0",
        f"train.save_every={10**9}", f"train.threads={threads}", f"train.grad_accum={accum}",
        f"train.fsdp={str(fsdp).lower()}", *args.overrides,
    ]
    train = ["-m", "draftforge.cli", "train", "--config", str(RECIPE), "--no-progress", *settings]
    if procs == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *train]


def steady_rate(records: list[dict]) -> float:
    """Tokens per second after step 1: each record's elapsed time is tokens / tok_per_s (a fresh run starts at 0)."""
    first, last = records[0], records[-1]
    elapsed = last["tokens"] / last["tok_per_s"] - first["tokens"] / first["tok_per_s"]
    return (last["tokens"] - first["tokens"]) / elapsed


def run_one(name: str, procs: int, args: argparse.Namespace, fsdp: bool, work: Path) -> dict:
    """One configuration: `procs` processes share the cores and the `args.procs` micro-batches of a step."""
    out = work / name.split()[0]
    threads, accum = max(1, args.cores // procs), args.procs // procs
    cmd = command(procs, threads, accum, args, out, fsdp)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DRAFTFORGE_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name, "processes": procs, "threads_per_process": threads, "fsdp": fsdp,
        "micro_batches_per_step": args.procs, "steps": len(records), "tokens": records[-1]["tokens"],
        "tok_per_s": steady_rate(records) if len(records) > 1 else records[-1]["tok_per_s"],
        "wall_s": wall, "losses": [r["loss"] for r in records], "command": " ".join(cmd),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per configuration (>= 2)")
    parser.add_argument("--procs", type=int, default=2, help="torchrun processes (1 process accumulates as many)")
    parser.add_argument("--cores", type=int, default=2, help="cores shared out: 1 process x cores threads, "
                        "procs processes x cores/procs")
    parser.add_argument("--fsdp", action="store_true", help="also time the processes with train.fsdp=true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="more dotted overrides for every run, e.g. train.precision=fp32")
    args = parser.parse_args()

    n = args.procs
    configs = [("single process", 1, False), (f"ddp {n} processes", n, False)]
    if args.fsdp:
        configs.append((f"fsdp2 {n} processes", n, True))
    with tempfile.TemporaryDirectory(prefix="draftforge-dist-bench-") as tmp:
        rows = [run_one(name, procs, args, fsdp, Path(tmp)) for name, procs, fsdp in configs]

    base = rows[0]["tok_per_s"]
    print(f"\nSmolLM2-135M demo recipe, online target, {args.steps} steps, the same global batches "
          f"({n} micro-batches per optimizer step); {args.cores} of {os.cpu_count()} cores used\n")
    print(f"{'configuration':<22}{'threads/proc':>13}{'tokens':>9}{'tok/s':>9}{'vs 1 proc':>11}{'wall s':>9}")
    for r in rows:
        print(f"{r['name']:<22}{r['threads_per_process']:>13}{r['tokens']:>9,}{r['tok_per_s']:>9.0f}"
              f"{r['tok_per_s'] / base:>10.2f}x{r['wall_s']:>9.1f}")
    drift = max(abs(a - b) / abs(a) for r in rows[1:] for a, b in zip(rows[0]["losses"], r["losses"], strict=True))
    print(f"\nlargest relative loss difference from the 1-process run: {drift:.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "recipe": str(RECIPE.relative_to(ROOT)), "steps": args.steps, "overrides": args.overrides,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "note": "tok_per_s: steady state after step 1; wall_s: whole command incl. start-up and target loading",
        "max_relative_loss_difference": drift, "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
