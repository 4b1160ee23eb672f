"""The draft vocabulary (docs/design.md §4.1): the target ids the draft can propose.

Count token ids at positions where loss_mask == 1 over the training set, keep the draft_vocab_size most
frequent (ties go to the smaller id), pad with the smallest unseen ids when fewer were seen, sort ascending.
`d2t[i] = target_id_i - i` is an offset, what SGLang and vLLM add to a draft id; `t2d` marks membership, and
because the ids are sorted `logits[..., t2d]` lists the draft ids in order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from draftforge import assets
from draftforge.config import DraftConfig
from draftforge.data.template import load_tokenizer
from draftforge.data.tokenized import TokenizedDataset, add_data_arguments, build_tokenized, data_config_from_args

VOCAB_VERSION = 1  # bump when the selection rule changes


@dataclass
class Vocab:
    d2t: torch.Tensor  # int64 [draft_vocab]: target id - draft id
    t2d: torch.Tensor  # bool [target_vocab]: is the target id in the draft vocabulary
    coverage: float  # share of supervised tokens whose id is in the draft vocabulary

    @property
    def target_ids(self) -> torch.Tensor:
        return self.d2t + torch.arange(len(self.d2t))


def token_counts(dataset: TokenizedDataset | Iterable[dict[str, Any]], target_vocab_size: int) -> np.ndarray:
    """How often each target id is supervised (loss_mask == 1)."""
    if isinstance(dataset, TokenizedDataset):
        ids = np.asarray(dataset.input_ids[dataset.loss_mask == 1], dtype=np.int64)
    else:
        parts = [np.asarray(s["input_ids"])[np.asarray(s["loss_mask"]) == 1] for s in dataset]
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= target_vocab_size):
        raise ValueError(f"token id {int(ids.max())} outside the target vocabulary of {target_vocab_size}")
    return np.bincount(ids, minlength=target_vocab_size)


def select_vocab(counts: np.ndarray, draft_vocab_size: int) -> Vocab:
    """The draft vocabulary from per-id counts, by the rule of the module docstring."""
    target_vocab_size = len(counts)
    if not 0 < draft_vocab_size <= target_vocab_size:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} must be in 1..{target_vocab_size}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no supervised tokens to select a draft vocabulary from")
    ids = np.arange(target_vocab_size)
    order = np.lexsort((ids, -counts))  # most frequent first, ties by smaller id; unseen ids follow by id
    chosen = np.sort(order[:draft_vocab_size])
    t2d = np.zeros(target_vocab_size, dtype=bool)
    t2d[chosen] = True
    return Vocab(d2t=torch.from_numpy(chosen - np.arange(draft_vocab_size)).to(torch.int64),
                 t2d=torch.from_numpy(t2d), coverage=int(counts[chosen].sum()) / total)


def build_vocab(dataset: TokenizedDataset | Iterable[dict[str, Any]], target_vocab_size: int,
                draft_vocab_size: int) -> Vocab:
    return select_vocab(token_counts(dataset, target_vocab_size), draft_vocab_size)


def save_vocab(path: str | Path, vocab: Vocab) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"d2t": vocab.d2t.contiguous(), "t2d": vocab.t2d.contiguous()}, str(tmp),
              metadata={"coverage": repr(vocab.coverage)})
    os.replace(tmp, path)


def load_vocab(path: str | Path) -> Vocab:
    with safe_open(str(path), framework="pt") as f:
        return Vocab(d2t=f.get_tensor("d2t"), t2d=f.get_tensor("t2d"), coverage=float(f.metadata()["coverage"]))


def cached_vocab(dataset: TokenizedDataset, target_vocab_size: int, draft_vocab_size: int,
                 cache_root: str | Path | None = None) -> Vocab:
    """build_vocab, cached under the dataset's key and both sizes (all that defines the result)."""
    key = hashlib.sha256(json.dumps([VOCAB_VERSION, dataset.key, target_vocab_size, draft_vocab_size]).encode())
    root = Path(cache_root) if cache_root is not None else assets.cache_dir() / "vocab"
    path = root / f"{key.hexdigest()[:24]}.safetensors"
    if path.exists():
        return load_vocab(path)
    vocab = build_vocab(dataset, target_vocab_size, draft_vocab_size)
    save_vocab(path, vocab)
    return vocab


def target_vocab_size(model_path: str, tokenizer: Any) -> int:
    """The target's embedding rows: config.json's vocab_size when the model dir has one, else the tokenizer's."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["vocab_size"])
    return len(tokenizer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--draft-vocab-size", type=int, default=DraftConfig().draft_vocab_size)
    parser.add_argument("--target-vocab-size", type=int, default=None,
                        help="default: vocab_size of the model's config.json, else the tokenizer's size")
    parser.add_argument("--output", required=True, metavar="vocab.safetensors")


def run(args: argparse.Namespace) -> int:
    model_path = assets.resolve_model_path(args.tokenizer)
    tokenizer = load_tokenizer(args.tokenizer)
    size = args.target_vocab_size or target_vocab_size(model_path, tokenizer)
    dataset = build_tokenized(data_config_from_args(args), tokenizer, args.tokenizer)
    counts = token_counts(dataset, size)
    vocab = select_vocab(counts, args.draft_vocab_size)
    save_vocab(args.output, vocab)
    seen = int((counts > 0).sum())
    print(f"draft vocabulary: {args.draft_vocab_size} of {size} target ids ({seen} ever supervised) cover "
          f"{vocab.coverage:.2%} of {int(counts.sum())} supervised tokens in {len(dataset)} samples")
    print(f"wrote d2t [{len(vocab.d2t)}] int64 and t2d [{len(vocab.t2d)}] bool to {args.output}")
    return 0
