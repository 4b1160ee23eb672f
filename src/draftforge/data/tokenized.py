"""Tokenised training samples, built once per (data, tokenizer + template, options) and cached.

A cache entry <cache>/tokenized/<key>/ holds:
  tokens.safetensors  input_ids int32 [T], loss_mask uint8 [T], offsets int64 [N+1]: sample i is
                      [offsets[i], offsets[i+1]); read back memory-mapped, so many processes share it
  ids.json            the sample ids, in order
  rejects.jsonl       conversations that could not become samples: id, reason, message
  meta.json           counts, rejects by reason, and everything the key was made from
The key hashes the rows' content, the tokenizer (vocabulary, merges, added and special tokens, chat
template) and the options that change a sample (max_length, system_prompt, last_turn_only, think). An
entry is written to a temporary directory and renamed into place: a reader never sees half of one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from draftforge import assets
from draftforge.config import DataConfig
from draftforge.data.conversations import load_rows
from draftforge.data.template import THINK_MODES, TemplateError, tokenize_row

FORMAT_VERSION = 1  # bump when the tokenisation or the layout changes
_CHUNK = 8  # conversations per worker task
_DTYPES = {"I32": np.int32, "U8": np.uint8, "I64": np.int64}

Conversations = str | Path | Sequence[str | Path] | Sequence[dict[str, Any]]


class TokenizedDataset:
    """Samples `{"input_ids": LongTensor[L], "loss_mask": LongTensor[L]}` of one cache entry."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        self.ids: list[str] = json.loads((self.path / "ids.json").read_text())
        arrays = _memmap_safetensors(self.path / "tokens.safetensors")
        self.input_ids: np.ndarray = arrays["input_ids"]  # flat, int32
        self.loss_mask: np.ndarray = arrays["loss_mask"]  # flat, uint8
        self.offsets: np.ndarray = arrays["offsets"]
        self.lengths: np.ndarray = np.diff(self.offsets)

    @property
    def key(self) -> str:
        return self.meta["key"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = range(len(self))[i]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "input_ids": torch.from_numpy(self.input_ids[a:b].astype(np.int64)),
            "loss_mask": torch.from_numpy(self.loss_mask[a:b].astype(np.int64)),
        }


def _memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map each tensor of a safetensors file (8-byte header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + size + begin, shape=shape)
                        if end > begin else np.zeros(shape, dtype))
    return arrays


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that changes token ids or the rendered text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocabulary, merges, normaliser, added tokens
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"class": type(tokenizer).__name__, "chat_template": tokenizer.chat_template,
                         "special_tokens": tokenizer.special_tokens_map}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def rows_hash(rows: Sequence[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def _options(data_cfg: DataConfig) -> dict[str, Any]:
    if data_cfg.think not in THINK_MODES:
        raise ValueError(f"data.think must be one of {THINK_MODES}, got {data_cfg.think!r}")
    return {"max_length": data_cfg.max_length, "system_prompt": data_cfg.system_prompt,
            "last_turn_only": data_cfg.last_turn_only, "think": data_cfg.think}


def _load_conversations(data_cfg: DataConfig, conversations: Conversations | None
                        ) -> tuple[list[dict[str, Any]], Counter]:
    """Rows to tokenise and the prepare-rejects met on the way (raw files go through prepare's parser)."""
    if conversations is None:
        conversations = data_cfg.sources
    if isinstance(conversations, (str, Path)):
        conversations = [conversations]
    items = list(conversations)
    if items and all(isinstance(item, dict) for item in items):
        return items[:data_cfg.max_rows], Counter()
    rows, rejects = load_rows(items, max_rows=data_cfg.max_rows)
    return rows, Counter(r.reason for r in rejects)


# --- tokenising, in worker processes -------------------------------------------------------------

_WORKER: tuple[Any, DataConfig] | None = None


def _init_worker(tokenizer: Any, data_cfg: DataConfig) -> None:
    global _WORKER
    _WORKER = (tokenizer, data_cfg)


def _tokenize(tokenizer: Any, data_cfg: DataConfig, row: dict[str, Any]) -> tuple:
    """(input_ids, loss_mask, truncated) of one row, or (reason, message) when it is rejected."""
    try:
        sample = tokenize_row(tokenizer, row, data_cfg)
    except TemplateError as e:
        return e.reason, str(e)
    return np.asarray(sample.input_ids, np.int32), np.asarray(sample.loss_mask, np.uint8), sample.truncated


def _tokenize_in_worker(row: dict[str, Any]) -> tuple:
    assert _WORKER is not None
    return _tokenize(*_WORKER, row)


def _tokenize_all(rows: list[dict[str, Any]], tokenizer: Any, data_cfg: DataConfig, progress: bool) -> list[tuple]:
    workers = data_cfg.num_workers or len(os.sched_getaffinity(0))
    bar = tqdm(total=len(rows), desc="tokenising", unit="conv", disable=not progress)
    results = []
    if workers <= 1 or len(rows) < 4 * _CHUNK:
        for row in rows:
            results.append(_tokenize(tokenizer, data_cfg, row))
            bar.update()
    else:
        # fork shares the tokenizer with the workers without pickling it; spawn pickles it once per worker
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        with ctx.Pool(workers, _init_worker, (tokenizer, data_cfg)) as pool:
            for result in pool.imap(_tokenize_in_worker, rows, chunksize=_CHUNK):
                results.append(result)
                bar.update()
    bar.close()
    return results


# --- building and caching ------------------------------------------------------------------------


def build_tokenized(data_cfg: DataConfig, tokenizer: Any, tokenizer_id: str,
                    conversations: Conversations | None = None, *, cache_root: str | Path | None = None,
                    progress: bool = True) -> TokenizedDataset:
    """Tokenise conversations (default: data_cfg.sources) with the tokenizer's chat template, or reuse the cache.

    `conversations` is a path or paths in any format `prepare` reads, or a list of normalised rows.
    """
    options = _options(data_cfg)
    rows, prepare_rejects = _load_conversations(data_cfg, conversations)
    if prepare_rejects:
        print(f"prepare: {sum(prepare_rejects.values())} records rejected before tokenising: "
              + ", ".join(f"{r} {n}" for r, n in prepare_rejects.most_common()), file=sys.stderr)
    inputs = {"version": FORMAT_VERSION, "data": rows_hash(rows), "tokenizer": tokenizer_fingerprint(tokenizer),
              "options": options}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_root) if cache_root is not None else assets.cache_dir() / "tokenized"
    final = root / key
    if final.is_dir():
        dataset = TokenizedDataset(final)
        print(f"tokenised dataset: reusing {final} ({len(dataset)} samples)", file=sys.stderr)
        return dataset

    results = _tokenize_all(rows, tokenizer, data_cfg, progress)
    ids, masks, sample_ids, rejects, truncated = [], [], [], [], 0
    for row, result in zip(rows, results, strict=True):
        if isinstance(result[0], str):
            rejects.append({"id": row["id"], "reason": result[0], "message": result[1]})
            continue
        ids.append(result[0])
        masks.append(result[1])
        sample_ids.append(row["id"])
        truncated += result[2]
    rejected = Counter(r["reason"] for r in rejects)
    if rejects:
        print(f"tokenise: {len(rejects)} of {len(rows)} conversations rejected: "
              + ", ".join(f"{r} {n}" for r, n in rejected.most_common()), file=sys.stderr)
    if not ids:
        raise ValueError(f"no usable samples: all {len(rows)} conversations were rejected "
                         f"({dict(rejected) or 'no conversations'}); first: {rejects[:1]}")
    offsets = np.zeros(len(ids) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    flat_ids, flat_mask = np.concatenate(ids), np.concatenate(masks)
    meta = {
        "key": key, "tokenizer_id": tokenizer_id, **inputs,
        "num_samples": len(ids), "num_tokens": int(offsets[-1]), "num_supervised": int(flat_mask.sum()),
        "num_truncated": truncated, "rows_in": len(rows), "rejected": dict(rejected),
        "prepare_rejected": dict(prepare_rejects),
    }

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({"input_ids": flat_ids, "loss_mask": flat_mask, "offsets": offsets}, str(tmp / "tokens.safetensors"))
    (tmp / "ids.json").write_text(json.dumps(sample_ids, ensure_ascii=False))
    (tmp / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same entry first; theirs is identical
        shutil.rmtree(tmp)
    print(f"tokenised {meta['num_samples']} samples: {meta['num_tokens']} tokens, {meta['num_supervised']} "
          f"supervised, {truncated} truncated at {data_cfg.max_length} -> {final}", file=sys.stderr)
    return TokenizedDataset(final)


# --- shared command-line options (vocab, inspect) -----------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser, building: bool = True) -> None:
    """Options that define samples; `building` adds those of building a whole dataset."""
    defaults = DataConfig()
    parser.add_argument("--data", action="append", required=True, metavar="PATH",
                        help="conversations (prepare's output or any format it reads; 'sharegpt' = packaged)")
    parser.add_argument("--tokenizer", default="smollm2", help="the target's tokenizer: 'smollm2', a dir or hub id")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--system-prompt", default=None, help="used when a conversation has no system turn")
    parser.add_argument("--last-turn-only", action="store_true", help="supervise only the last assistant turn")
    parser.add_argument("--think", choices=THINK_MODES, default=defaults.think,
                        help="empty <think></think> blocks: leave unsupervised (mask) or train on them")
    if building:
        parser.add_argument("--max-rows", type=int, default=None)
        parser.add_argument("--num-workers", type=int, default=None, help="tokenising processes (default: all cores)")


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    return DataConfig(sources=list(args.data), max_rows=getattr(args, "max_rows", None), max_length=args.max_length,
                      system_prompt=args.system_prompt, last_turn_only=args.last_turn_only, think=args.think,
                      num_workers=getattr(args, "num_workers", None))
