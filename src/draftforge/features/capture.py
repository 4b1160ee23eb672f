"""Run the target once over the tokenised dataset and write a feature store for offline training.

    draftforge capture --config recipes/smollm2-135m.yaml features.store=stores/smollm2
    draftforge capture --config ... features.store=stores/smollm2-int8 features.store_dtype=int8
    torchrun --nproc_per_node 4 -m draftforge.cli capture --config ...    (each rank its own shards)
    draftforge capture --config ... --verify     check every shard against its checksum
    draftforge capture --config ... --repair     recompute the shards that fail the check

`draftforge train` with the same config then reads the store instead of running the target.

Shard i belongs to rank i % WORLD_SIZE (torchrun's environment; no process group is needed, ranks
share only the directory). A shard is written to a temporary file, hashed and renamed into place,
then its record: a capture killed at any point resumes by skipping the recorded shards. The last
rank to finish folds the records into the manifest and marks the store complete.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from draftforge.config import ConfigError, RunConfig, load_config
from draftforge.data.batch import collate, teacher_row_mask
from draftforge.features.store import (
    FORMAT,
    STORE_DTYPES,
    VERSION,
    StoreError,
    bytes_per_token,
    channel_scales,
    encode,
    identity_problems,
    plan_shards,
    publish,
    shard_name,
    shard_problem,
    shard_record,
    store_identity,
    write_json,
    write_shard,
)
from draftforge.target.base import DTYPES


def _ranks() -> tuple[int, int, int]:
    """(rank, world size, processes on this machine) from torchrun's environment; (0, 1, 1) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_WORLD_SIZE", 1))


def new_manifest(config: RunConfig, identity: dict[str, Any], dataset, hidden: int) -> dict[str, Any]:
    """The manifest before any shard exists: a pure function of config, target and data (all ranks agree)."""
    store_dtype = config.features.store_dtype
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"features.store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    shard_tokens = max(1, int(config.features.shard_mb * (1 << 20) / bytes_per_token(store_dtype, hidden)))
    lengths = np.asarray(dataset.lengths)
    plan = plan_shards(lengths, shard_tokens)
    return {
        "format": FORMAT, "version": VERSION, "complete": False, "identity": identity,
        "layout": {"store_dtype": store_dtype, "dtype": STORE_DTYPES[store_dtype], "aux_width": 3 * hidden,
                   "hidden_size": hidden, "scales": "f32 per row (aux: per tap)" if store_dtype in ("int8", "fp8")
                   else None, "final_rows": "teacher"},
        "capture": {"target_dtype": config.target.dtype, "capture_tokens": config.features.capture_tokens,
                    "shard_mb": config.features.shard_mb},
        "samples": {"count": len(lengths), "ids": list(dataset.ids), "lengths": lengths.tolist(),
                    "tokens": int(lengths.sum())},
        "shards": [{"file": shard_name(i), "samples": [a, b], "tokens": int(lengths[a:b].sum())}
                   for i, (a, b) in enumerate(plan)],
    }


def _plan(manifest: dict[str, Any]) -> tuple:
    return manifest["samples"], [s["samples"] for s in manifest["shards"]]


def open_manifest(root: Path, fresh: dict[str, Any], calibrate: Callable[[], dict[str, list[float]]]
                  ) -> dict[str, Any]:
    """The store's manifest: the existing one if it describes the same capture, else `fresh` with its
    calibration, created exclusively (of ranks racing to create it, all use the winner's)."""
    path = root / "manifest.json"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        created = {**fresh, "calibration": calibrate()}
        if publish(path, created):
            return created
    old = json.loads(path.read_text())
    problems = identity_problems(old["identity"], fresh["identity"])
    if old["layout"] != fresh["layout"]:
        was, now = old["layout"]["store_dtype"], fresh["layout"]["store_dtype"]
        problems.append(f"layout: store has {was}, this config {now}")
    elif _plan(old) != _plan(fresh):
        problems.append("shard plan: features.shard_mb differs")
    if problems:
        raise StoreError(f"{root} holds a different capture:\n  " + "\n  ".join(problems)
                         + "\nChoose another features.store, or delete this one.")
    return old


@torch.no_grad()
def calibrate(target, dataset, store_dtype: str, tokens: int, device: torch.device) -> dict[str, list[float]]:
    """int8 channel divisors from the first `tokens` tokens of the data (one forward); {} otherwise."""
    if store_dtype != "int8":
        return {}
    ends = np.cumsum(np.asarray(dataset.lengths))
    b = collate(dataset, range(min(len(ends), int(np.searchsorted(ends, tokens)) + 1)))
    feats = target.features(b.input_ids.to(device), b.attention_mask.to(device))
    valid = b.attention_mask.bool().to(device)
    return {"aux": channel_scales(feats.aux[valid].cpu()).tolist(),
            "final": channel_scales(feats.final_hidden[valid].cpu()).tolist()}


def finalize(root: Path, manifest: dict[str, Any]) -> bool:
    """Fold every shard's record into the manifest once all exist; False while some are missing.
    `capture_seconds` sums the shards' seconds: the store's cost, which a budget that counts capture adds."""
    records = [shard_record(root, i) for i in range(len(manifest["shards"]))]
    if any(r is None for r in records):
        return False
    shards = [{**entry, "bytes": r["bytes"], "sha256": r["sha256"], "seconds": r.get("seconds")}
              for entry, r in zip(manifest["shards"], records, strict=True)]
    seconds = [s["seconds"] for s in shards]
    total = round(sum(seconds), 3) if None not in seconds else None  # None: a shard from before records had it
    write_json(root / "manifest.json", {**manifest, "shards": shards, "capture_seconds": total, "complete": True})
    return True


def verify(root: Path, shards: list[int] | None = None) -> dict[int, str]:
    """Problems by shard index (all shards, or those given): missing, truncated, corrupted, not captured."""
    manifest = json.loads((root / "manifest.json").read_text())
    problems = {}
    for i in range(len(manifest["shards"])) if shards is None else shards:
        entry = manifest["shards"][i] if manifest.get("complete") else shard_record(root, i)
        problem = "not captured yet" if entry is None else shard_problem(root, entry)
        if problem:
            problems[i] = problem
    return problems


def _pack(order: list[int], lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Consecutive runs of `order` (longest first) with len(batch) * longest <= budget."""
    batches: list[list[int]] = []
    for i in order:
        if batches and int(lengths[batches[-1][0]]) * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def capture_shard(target, dataset, start: int, end: int, manifest: dict[str, Any], capture_tokens: int,
                  device: torch.device, bar) -> dict[str, torch.Tensor]:
    """Features of samples [start, end): target forwards over length-sorted batches, stored in sample order."""
    store_dtype = manifest["layout"]["store_dtype"]
    channel = {k: torch.tensor(v) for k, v in manifest.get("calibration", {}).items()}
    lengths = np.asarray(dataset.lengths)
    order = (np.argsort(-lengths[start:end], kind="stable") + start).tolist()
    parts: dict[int, tuple] = {}
    for batch in _pack(order, lengths, capture_tokens):
        b = collate(dataset, batch)
        feats = target.features(b.input_ids.to(device), b.attention_mask.to(device))
        for row, i in enumerate(batch):
            n = int(lengths[i])
            rows = teacher_row_mask(b.loss_mask[row, :n])
            aux = encode(feats.aux[row, :n].cpu(), store_dtype, 3, channel.get("aux"))
            final = encode(feats.final_hidden[row, :n].cpu()[rows], store_dtype, 1, channel.get("final"))
            parts[i] = (aux, final, rows)
        bar.update(int(lengths[batch].sum()))
    ordered = [parts[i] for i in range(start, end)]
    tensors = {"aux": torch.cat([p[0][0] for p in ordered]), "final": torch.cat([p[1][0] for p in ordered]),
               "teacher": torch.cat([p[2] for p in ordered]).to(torch.uint8)}
    if ordered[0][0][1] is not None:
        tensors["aux_scale"] = torch.cat([p[0][1] for p in ordered])
        tensors["final_scale"] = torch.cat([p[1][1] for p in ordered])
    return tensors


def _summary(root: Path, manifest: dict[str, Any], done: int, skipped: int, tokens: int, seconds: float,
             rank: int, world: int) -> str:
    who = f" (rank {rank} of {world})" if world > 1 else ""
    lines = [f"capture{who}: {done} shards written, {skipped} already finished; {tokens:,} tokens in "
             f"{seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tok/s)"]
    total = json.loads((root / "manifest.json").read_text())
    if total.get("complete"):
        size = sum(s["bytes"] for s in total["shards"])
        count = total["samples"]["tokens"]
        lines.append(f"store {root}: complete, {len(total['shards'])} shards, {count:,} tokens, "
                     f"{size / 2**20:,.1f} MiB, {size / max(count, 1):,.0f} bytes/token "
                     f"({manifest['layout']['store_dtype']})")
    else:
        lines.append(f"store {root}: incomplete (other ranks still writing, or run capture again)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (the one training will use); features.store is required")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. features.store=stores/x")
    parser.add_argument("--verify", action="store_true", help="check every shard of the store; exit 1 if any is bad")
    parser.add_argument("--repair", action="store_true", help="recompute the shards that fail --verify")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.verify and not args.repair:
        return _verify_command(Path(_store(config)))
    print(capture(config, args.repair, not args.no_progress and os.environ.get("DRAFTFORGE_NO_PROGRESS") is None))
    return 0


def _store(config: RunConfig) -> str:
    if not config.features.store:
        raise ConfigError("capture needs features.store=DIR (where the store is written)")
    return config.features.store


def capture(config: RunConfig, repair: bool = False, progress: bool = True) -> str:
    """Write this rank's shards of `features.store` that are missing (and, with `repair`, those that fail
    their check); returns the summary to print. A complete store costs only the loading of the target."""
    root = Path(_store(config))
    rank, world, local_world = _ranks()

    from draftforge.data.template import load_tokenizer
    from draftforge.data.tokenized import build_tokenized
    from draftforge.target.hf import HFTarget

    torch.set_num_threads(config.train.threads or max(1, len(os.sched_getaffinity(0)) // local_world))
    tokenizer = load_tokenizer(config.target.path)
    dataset = build_tokenized(config.data, tokenizer, config.target.path, progress=progress and rank == 0)
    target = HFTarget.from_pretrained(config.target.path, config.target.aux_layers, DTYPES[config.target.dtype],
                                      config.target.trust_remote_code)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    target.model.to(device)
    hidden = int(target.embed_weight.shape[1])
    identity = store_identity(config.target.path, dataset, target.aux_layers)
    manifest = open_manifest(root, new_manifest(config, identity, dataset, hidden), lambda: calibrate(
        target, dataset, config.features.store_dtype, config.features.capture_tokens, device))

    mine = list(range(rank, len(manifest["shards"]), world))
    for stale in (root / "shards").glob(".*.tmp-*") if (root / "shards").is_dir() else []:
        if int(stale.name[1:6]) in mine:  # a temporary shard of ours left by a killed capture
            stale.unlink(missing_ok=True)
    if repair:
        bad = {i: p for i, p in verify(root, mine).items() if p != "not captured yet"}
        for i, problem in bad.items():
            print(f"repair: {problem}; recomputing")
            (root / shard_name(i)).with_suffix(".json").unlink(missing_ok=True)
            (root / shard_name(i)).unlink(missing_ok=True)
        if bad and manifest.get("complete"):
            manifest = {**manifest, "complete": False}
            write_json(root / "manifest.json", manifest)
    todo = [i for i in mine if shard_record(root, i) is None]
    tokens = sum(manifest["shards"][i]["tokens"] for i in todo)
    bar = tqdm(total=tokens, desc="capture" + (f" rank {rank}" if world > 1 else ""), unit="tok", unit_scale=True,
               position=rank if world > 1 else None, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i in todo:
        a, b = manifest["shards"][i]["samples"]
        started = time.perf_counter()
        tensors = capture_shard(target, dataset, a, b, manifest, config.features.capture_tokens, device, bar)
        write_shard(root, i, tensors, time.perf_counter() - started)
    bar.close()
    finalize(root, manifest)
    return _summary(root, manifest, len(todo), len(mine) - len(todo), tokens, time.perf_counter() - t0, rank, world)


def _verify_command(root: Path) -> int:
    if not (root / "manifest.json").exists():
        raise StoreError(f"{root} is not a feature store (no manifest.json)")
    manifest = json.loads((root / "manifest.json").read_text())
    problems = verify(root)
    shards = manifest["shards"]
    for i, problem in sorted(problems.items()):
        print(f"BAD {shard_name(i)}: {problem}")
    bad = len(problems)
    state = "complete" if manifest.get("complete") else "incomplete"
    print(f"verify {root}: {len(shards) - bad} of {len(shards)} shards good ({state}, "
          f"{manifest['samples']['tokens']:,} tokens)")
    if bad:
        print("run `draftforge capture --repair` with the store's config to recompute the bad shards")
    return 1 if bad else 0
