"""Offline (feature store) vs online (live target) training for the SmolLM2 recipe: training tokens/s,
peak memory, disk per token of each store kind; with --tau-steps also the acceptance a compact store
costs (same data, same budget, both drafts scored on the same bf16 features).

    python benchmarks/offline_vs_online.py                          # 64 conversations, 4 steps per mode
    python benchmarks/offline_vs_online.py --rows 120 --repeats 0 --tau-steps 40 --eval-fraction 0.1

Stores are captured once per (rows, dtype) under --work and reused. Each training mode runs in its own
subprocess (clean peak RSS) and is timed after one warm-up step; tok/CPU-s (tokens per CPU-second of
the process, all threads) is steadier than wall-clock tok/s on a shared machine. Prints a table and
writes benchmarks/results/offline_vs_online.json (offline_vs_online_tau.json with --tau-steps).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m.yaml"
RESULTS = Path(__file__).parent / "results" / "offline_vs_online.json"
GIB = 1 << 30


def recipe_overrides(args: argparse.Namespace, out_dir: Path, *extra: str) -> list[str]:
    return [f"data.max_rows={args.rows}", f"data.eval_fraction={args.eval_fraction}", "train.eval_every=0",
            f"train.out_dir={out_dir}", *([f"train.threads={args.threads}"] if args.threads else []), *extra]


def capture_store(args: argparse.Namespace, store_dtype: str) -> dict:
    """Capture (or reuse) the store of this data slice in `store_dtype`; its disk use and capture speed."""
    from draftforge.cli import main

    store = args.work / f"store-{args.rows}-{store_dtype}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["capture", "--config", str(RECIPE), "--no-progress", *recipe_overrides(
            args, args.work / "unused", f"features.store={store}", f"features.store_dtype={store_dtype}")])
    if rc != 0:
        raise SystemExit(f"capture {store_dtype} failed: {out.getvalue()}")
    manifest = json.loads((store / "manifest.json").read_text())
    size, tokens = sum(s["bytes"] for s in manifest["shards"]), manifest["samples"]["tokens"]
    speed = re.search(r"([\d,]+) tok/s", out.getvalue())
    return {"store": str(store), "bytes": size, "tokens": tokens, "bytes_per_token": size / tokens,
            "capture_tok_per_s": float(speed.group(1).replace(",", "")) if speed and tokens else None}


def peak_rss_gib() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would include the parent's, kept across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / GIB


def child(spec: dict) -> dict:
    """One training run in this process: `steps` train steps, or (with "checkpoints") eval of drafts."""
    import torch

    from draftforge.config import load_config
    from draftforge.train.checkpoint import latest_checkpoint, load_checkpoint
    from draftforge.train.setup import build_training

    trainer = build_training(load_config(str(RECIPE), spec["overrides"]))
    if "checkpoints" in spec:  # score trained drafts on this trainer's eval features
        scores = {}
        for name, run_dir in spec["checkpoints"].items():
            state, _, _ = load_checkpoint(latest_checkpoint(run_dir))
            trainer.draft.load_state_dict(state, strict=False)
            scores[name] = trainer.evaluate()
        return scores
    if spec.get("fit"):
        return trainer.fit(progress=False)
    trainer.train_step()  # warm-up: allocator, oneDNN caches, the first shard reads
    wall = cpu = tokens = 0.0
    for _ in range(spec["steps"]):
        t0, c0, tok0 = time.perf_counter(), time.process_time(), trainer.tokens
        trainer.train_step()
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        tokens += trainer.tokens - tok0
    return {"tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / cpu, "tokens": tokens,
            "peak_rss_gib": peak_rss_gib(),
            "prefetch_hits": getattr(trainer.features, "hits", None), "threads": torch.get_num_threads()}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="ShareGPT conversations (data.max_rows)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, the fastest reported (0: no speed)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-fraction", type=float, default=0.02)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "int8", "fp8"])
    parser.add_argument("--tau-steps", type=int, default=0, help="train bf16 and int8 stores this long, compare tau")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-offline"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    args.work = args.work.resolve()

    stores = {d: capture_store(args, d) for d in args.dtypes}
    modes = {"online": None, **{f"offline-{d}": d for d in args.dtypes}}
    speed: dict[str, dict] = {}
    for _ in range(args.repeats):  # modes interleaved, best of the repeats: a shared machine's load varies
        for mode, dtype in modes.items():
            extra = [f"features.store={stores[dtype]['store']}"] if dtype else []
            over = recipe_overrides(args, args.work / f"speed-{mode}", f"train.max_steps={args.steps + 1}", *extra)
            result = run_child({"overrides": over, "steps": args.steps})
            if mode not in speed or result["tok_per_s"] > speed[mode]["tok_per_s"]:
                speed[mode] = result

    tau = {}
    if args.tau_steps:
        runs = {}
        for dtype in ("bf16", "int8"):
            runs[dtype] = str(args.work / f"tau-{args.rows}-{args.tau_steps}-{dtype}")
            over = recipe_overrides(args, Path(runs[dtype]), f"train.max_steps={args.tau_steps}",
                                    "train.budget_minutes=null", f"train.save_every={args.tau_steps}",
                                    f"features.store={stores[dtype]['store']}")
            tau[f"final_{dtype}"] = run_child({"overrides": over, "fit": True})
        judge = recipe_overrides(args, args.work / "unused", f"features.store={stores['bf16']['store']}")
        tau["scored_on_bf16_features"] = run_child({"overrides": judge, "checkpoints": runs})

    from draftforge.config import load_config

    cfg = load_config(str(RECIPE), recipe_overrides(args, args.work))
    shape = {"max_length": cfg.data.max_length, "ttt_steps": cfg.train.ttt_steps, "precision": cfg.train.precision,
             "target_dtype": cfg.target.dtype, "tokens_per_batch": cfg.train.tokens_per_batch,
             "draft_vocab_size": cfg.draft.draft_vocab_size}
    bf16_bpt = stores.get("bf16", {}).get("bytes_per_token")
    print(f"\nSmolLM2-135M recipe {shape}, {args.rows} conversations, {platform.machine()}")
    print(f"{'mode':<14} {'bytes/token':>11} {'vs bf16':>8} {'capture tok/s':>13} {'train tok/s':>11} "
          f"{'tok/CPU-s':>9} {'peak RSS':>9}")
    for mode, dtype in modes.items():
        st = stores.get(dtype, {})
        bpt = f"{st['bytes_per_token']:,.0f}" if st else "-"
        ratio = f"{st['bytes_per_token'] / bf16_bpt:.3f}" if st and bf16_bpt else "-"
        cap = f"{st['capture_tok_per_s']:,.0f}" if st.get("capture_tok_per_s") else "-"
        s = speed.get(mode)
        run = f"{s['tok_per_s']:>11,.0f} {s['tok_per_cpu_s']:>9,.0f} {s['peak_rss_gib']:>7.2f} G" if s else ""
        print(f"{mode:<14} {bpt:>11} {ratio:>8} {cap:>13} {run}")
    if tau:
        scored = tau["scored_on_bf16_features"]
        if not scored["bf16"]:
            raise SystemExit("the eval split is empty: raise --eval-fraction or --rows")
        print(f"\nsimulated tau after {args.tau_steps} steps, eval split scored on the bf16 store's features:")
        for dtype in ("bf16", "int8"):
            m = scored[dtype]
            accs = " ".join(f"{m[f'eval_acc_{k}']:.3f}" for k in range(7) if f"eval_acc_{k}" in m)
            print(f"  trained on {dtype:<5} tau {m['eval_sim_tau']:.3f}  loss {m['eval_loss']:.3f}  acc_k {accs}")
        print(f"  difference (int8 - bf16): {scored['int8']['eval_sim_tau'] - scored['bf16']['eval_sim_tau']:+.3f}")

    out = RESULTS.with_name(RESULTS.stem + ("_tau" if tau else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": shape, "rows": args.rows, "steps": args.steps, "tau_steps": args.tau_steps,
                               "stores": stores,
                               "train": speed, "tau": tau, "machine": platform.platform()}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
