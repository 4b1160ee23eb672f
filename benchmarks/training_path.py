"""The whole training path of the demo recipe (recipes/smollm2-135m.yaml, data/regenerated/), in one run:
online training tokens/s (and its target-forward / draft-step split), capture tokens/s, training from the
captured store tokens/s, and a plain target forward (transformers' decoder with the batch's attention
mask, no hooks' work) on the same batches as online training and as capture. It also bounds the target
forward from above (its linear layers' FLOPs at this machine's GEMM rate on their shapes, timed in the
same run), and so online training with today's draft step.

    python benchmarks/training_path.py                          # 96 conversations, 4 timed steps per mode
    python benchmarks/training_path.py --quick                  # 32 conversations, 2 steps: a smoke run
    python benchmarks/training_path.py --compare /work/main/src --repeats 2   # before / after, interleaved

--compare runs the same measurement with another checkout's `src` on PYTHONPATH (this script uses only
APIs main has), alternating with this checkout; the table gives the best of the repeats for each and
their ratio. On a shared machine the load moves between phases of one run, so each figure is also
given relative to the plain forward timed next to it ("/ plain": the online figures to the forward
on the online batches, capture and offline to the forward on the capture batches), which is the same
code in both checkouts; compare those when the load average is not steady. Tokens are valid
(unpadded) tokens. Writes benchmarks/results/training_path.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
RESULTS = Path(__file__).parent / "results" / "training_path.json"
MODES = ["online", "online_target", "online_draft", "plain_forward_online_batches", "capture",
         "plain_forward_capture_batches", "offline"]
PLAIN = {"online": "plain_forward_online_batches", "online_target": "plain_forward_online_batches",
         "online_draft": "plain_forward_online_batches", "capture": "plain_forward_capture_batches",
         "offline": "plain_forward_capture_batches"}  # the plain forward timed next to each figure


def overrides(rows: int, steps: int, threads: int, out: Path, *extra: str) -> list[str]:
    return [f"data.max_rows={rows}", "data.eval_fraction=0.02", "train.eval_every=0", f"train.out_dir={out}",
            f"train.max_steps={steps + 1}", f"train.threads={threads}", *extra]


def time_training(config, steps: int) -> tuple[dict, list]:
    """tok/s of `steps` train steps after one warm-up; for a live target also its features' share, and the
    batches it ran (for the plain forward)."""
    from draftforge.train.setup import build_training

    trainer = build_training(config)
    features, seen, spent = trainer.features, [], [0.0]

    def timed(batch):
        t0 = time.perf_counter()
        out = features(batch)
        spent[0] += time.perf_counter() - t0
        seen.append(batch)
        return out

    trainer.features = timed
    trainer.train_step()  # warm-up: allocator, oneDNN caches, the first shard reads
    spent[0], seen[:] = 0.0, []
    t0, tokens0 = time.perf_counter(), trainer.tokens
    for _ in range(steps):
        trainer.train_step()
    wall, tokens = time.perf_counter() - t0, trainer.tokens - tokens0
    result = {"tok_s": tokens / wall, "tokens": tokens, "features_s": spent[0], "wall_s": wall}
    trainer.close()
    return result, seen


def time_plain_forward(target, batches: list) -> float:
    """Valid tokens/s of transformers' decoder forward with each batch's attention mask."""
    import torch

    from draftforge.target.hf import decoder

    base = decoder(target.model)
    with torch.no_grad():
        base(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask, use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    return sum(b.tokens for b in batches) / (time.perf_counter() - t0)


def forward_roofline(target, batch) -> dict:
    """The most tokens/s any implementation of the plain forward can reach here: the FLOPs of its linear
    layers per token (attention, norms and activations taken as free) at this machine's GEMM rate on
    exactly those matmul shapes, measured now. A lower bound on the work, so an upper bound on speed."""
    import torch
    from train_step import count_step, gemm_rate

    from draftforge.target.hf import decoder

    base = decoder(target.model)
    with torch.no_grad():
        _, gemms = count_step(lambda: base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           use_cache=False))
    linears = {shape: n for shape, n in gemms.items() if shape[0] == 1}  # 2-D matmuls: the linear layers
    flops = sum(n * 2.0 * m * k * cols for (_, m, k, cols, _), n in linears.items())
    per_token = flops / batch.input_ids.numel()  # every linear runs at every position, padding included
    rate = gemm_rate(linears)
    return {"linear_gflop_per_token": per_token / 1e9, "gemm_gflops": rate, "max_tok_s": rate * 1e9 / per_token}


def capture_batches(config, manifest: dict) -> list:
    """The batches capture ran: each shard's samples longest first, packed under features.capture_tokens."""
    import numpy as np

    from draftforge.data.batch import collate
    from draftforge.data.template import load_tokenizer
    from draftforge.data.tokenized import build_tokenized
    from draftforge.features.capture import _pack

    dataset = build_tokenized(config.data, load_tokenizer(config.target.path), config.target.path, progress=False)
    lengths = np.asarray(dataset.lengths)
    batches = []
    for shard in manifest["shards"]:
        a, b = shard["samples"]
        order = (np.argsort(-lengths[a:b], kind="stable") + a).tolist()
        batches += [collate(dataset, batch) for batch in _pack(order, lengths, config.features.capture_tokens)]
    return batches


def child(spec: dict) -> dict:
    """Every figure of one checkout, in this process."""
    import torch

    from draftforge.cli import main
    from draftforge.config import load_config
    from draftforge.target.base import DTYPES
    from draftforge.target.hf import HFTarget

    rows, steps, threads, work = spec["rows"], spec["steps"], spec["threads"], Path(spec["work"])
    res: dict = {"loadavg_start": os.getloadavg()}
    online, seen = time_training(load_config(str(RECIPE), overrides(rows, steps, threads, work / "online")), steps)
    res["online"] = online["tok_s"]
    res["online_target"] = online["tokens"] / online["features_s"]
    res["online_draft"] = online["tokens"] / (online["wall_s"] - online["features_s"])

    config = load_config(str(RECIPE), overrides(rows, steps, threads, work / "unused"))
    torch.set_num_threads(threads)
    target = HFTarget.from_pretrained(config.target.path, config.target.aux_layers, DTYPES[config.target.dtype])
    res["plain_forward_online_batches"] = time_plain_forward(target, seen)
    res["forward_roofline"] = forward_roofline(target, max(seen, key=lambda b: b.tokens))

    store = work / "store"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["capture", "--config", str(RECIPE), "--no-progress",
                   *overrides(rows, steps, threads, work / "unused", f"features.store={store}",
                              f"features.store_dtype={spec['store_dtype']}")])
    speed = re.search(r"([\d,]+) tok/s", out.getvalue())
    if rc != 0 or not speed:
        raise SystemExit(f"capture failed: {out.getvalue()}")
    res["capture"] = float(speed.group(1).replace(",", ""))
    manifest = json.loads((store / "manifest.json").read_text())
    res["bytes_per_token"] = sum(s["bytes"] for s in manifest["shards"]) / manifest["samples"]["tokens"]
    res["plain_forward_capture_batches"] = time_plain_forward(target, capture_batches(config, manifest))

    offline = overrides(rows, steps, threads, work / "offline", f"features.store={store}")
    res["offline"] = time_training(load_config(str(RECIPE), offline), steps)[0]["tok_s"]
    res["loadavg_end"] = os.getloadavg()
    return res


def run_child(spec: dict, src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(spec["threads"]), DRAFTFORGE_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory(prefix="training-path-") as work:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "work": work})],
                              capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child ({src}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def roofline_summary(r: dict) -> str:
    """How far the online figure can move: the target forward against its matmul bound, and online training
    with that bound and today's draft step (one run's figures, so one load)."""
    roof = r["forward_roofline"]
    bound = 1 / (1 / roof["max_tok_s"] + 1 / r["online_draft"])
    return (f"target forward: {roof['linear_gflop_per_token']:.3f} GFLOP/token in its linear layers; at this "
            f"machine's GEMM rate on their shapes ({roof['gemm_gflops']:,.0f} GFLOP/s) no forward exceeds "
            f"{roof['max_tok_s']:,.0f} tok/s; the plain forward ran {r['plain_forward_online_batches']:,.0f} "
            f"({r['plain_forward_online_batches'] / roof['max_tok_s']:.0%} of that)\n"
            f"online training with that forward and today's draft step ({r['online_draft']:,.0f} tok/s): at most "
            f"{bound:,.0f} tok/s, {bound / r['online']:.2f}x today's {r['online']:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="conversations of the recipe's data (data.max_rows)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store-dtype", default="int8", help="the captured store's dtype")
    parser.add_argument("--quick", action="store_true", help="--rows 32 --steps 2: a smoke run")
    parser.add_argument("--compare", type=Path, help="another checkout's src directory, measured alternately")
    parser.add_argument("--repeats", type=int, default=1, help="runs per checkout, the best of each reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.rows, args.steps = 32, 2
    spec = {"rows": args.rows, "steps": args.steps, "threads": args.threads, "store_dtype": args.store_dtype}
    sources = {"this": ROOT / "src", **({"compare": args.compare.resolve()} if args.compare else {})}
    runs: dict[str, list[dict]] = {name: [] for name in sources}
    for _ in range(args.repeats):
        for name, src in sources.items():
            r = run_child(spec, src)
            runs[name].append(r)
            print(f"  {name} ({src}): " + ", ".join(f"{m} {r[m]:,.0f}" for m in MODES)
                  + f" tok/s; load {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}", flush=True)
    best = {name: {m: max(r[m] for r in rs) for m in MODES} for name, rs in runs.items()}
    relative = {name: {m: max(r[m] / r[p] for r in rs) for m, p in PLAIN.items()} for name, rs in runs.items()}

    print(f"\nSmolLM2-135M demo recipe, {args.rows} conversations, {args.steps} timed steps, {args.threads} threads, "
          f"{args.store_dtype} store ({runs['this'][0]['bytes_per_token']:,.0f} bytes/token), {platform.machine()}")
    head = f"{'tokens/s (best of ' + str(args.repeats) + ')':<32} {'this':>9} {'/ plain':>7}"
    head += f" {'compare':>9} {'/ plain':>7} {'ratio':>6} {'/ plain':>7}" if args.compare else ""
    print(head + "\n" + "-" * len(head))
    for m in MODES:
        rel = {name: f"{relative[name][m]:>7.2f}" if m in PLAIN else f"{'':>7}" for name in runs}
        line = f"{m:<32} {best['this'][m]:>9,.0f} {rel['this']}"
        if args.compare:
            ratio = f"{relative['this'][m] / relative['compare'][m]:>6.2f}x" if m in PLAIN else ""
            line += (f" {best['compare'][m]:>9,.0f} {rel['compare']} {best['this'][m] / best['compare'][m]:>5.2f}x"
                     f" {ratio}")
        print(line)
    ratio = best["this"]["capture"] / best["this"]["plain_forward_capture_batches"]
    print(f"capture / plain forward on its batches: {ratio:.2f}x")
    print(roofline_summary(runs["this"][-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"spec": spec, "sources": {k: str(v) for k, v in sources.items()}, "runs": runs,
                                    "best": best, "relative_to_plain_forward": relative,
                                    "machine": platform.platform()}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
