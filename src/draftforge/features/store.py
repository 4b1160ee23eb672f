"""Offline feature store: the target's aux taps and final hidden state for every token of a tokenised
dataset, written once by `capture` and read by training in place of a live target.

A store directory holds:
  manifest.json              identity (target fingerprint, tokenizer, tokenised-data key, taps), layout
                             (dtypes, widths), samples (ids, lengths), the shard plan; once every shard is
                             written, each shard's size, sha256 and seconds, their sum
                             `capture_seconds` and `"complete": true`
  shards/NNNNN.safetensors   dataset samples [start, end) concatenated in order, T tokens:
      aux          [T, 3*H]  bf16 | f32 | int8 | f8_e4m3
      aux_scale    [T, 3]    f32, 8-bit only: one scale per row and tap (x ~ q * scale)
      final        [F, H]    the final hidden state at teacher rows only (below)
      final_scale  [F, 1]    f32, 8-bit only
      teacher      [T]       u8: 1 where `final` holds the row
  int8 stores also keep per-channel divisors in the manifest ("calibration", see `channel_scales`).
  shards/NNNNN.json          the shard's record (bytes, sha256, seconds its target forwards and encoding
                             took); written after the shard, so its presence
                             marks the shard finished

TTT reads the final hidden state only at teacher rows: index t of a sample where t+1 is supervised
(ttt_forward's `cand`). Elsewhere it is never used, so it is not stored (a third of it on chat data)
and the trainer gets zeros there. 8-bit rows are scaled by their absolute maximum, per tap for aux:
the three taps differ in magnitude by orders, and a few outlier channels would otherwise flatten
every other channel of a row to zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from draftforge.config import ConfigError
from draftforge.target.base import TargetFeatures

FORMAT = "draftforge-feature-store"
VERSION = 1
STORE_DTYPES = {"fp32": "F32", "bf16": "BF16", "int8": "I8", "fp8": "F8_E4M3"}
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
          "U8": torch.uint8}
_RAW = {"F32": np.float32, "BF16": np.uint16, "I8": np.int8, "F8_E4M3": np.uint8, "U8": np.uint8}  # same bits
_QMAX = {"int8": 127.0, "fp8": 448.0}
_ITEMSIZE = {"F32": 4, "BF16": 2, "I8": 1, "F8_E4M3": 1}


class StoreError(ConfigError):
    """A store that cannot serve this run: damaged, incomplete or captured for something else.
    The message names the shard or the mismatch (reported without a traceback)."""


# ---- encoding ---------------------------------------------------------------------------------------


def channel_scales(x: Tensor) -> Tensor:
    """Per-channel divisors that flatten a row before int8 (SmoothQuant with alpha 1/2): the square
    root of each channel's RMS over calibration rows x [N, D]. Outlier channels (up to 10^4 x the
    median on SmolLM2) then no longer set the row's step for all others: 3-4x less error. fp8 has a
    relative step already and gains nothing."""
    c = x.float().pow(2).mean(0).sqrt().sqrt()
    return c.clamp(min=float(c.mean()) * 1e-2)


def encode(x: Tensor, store_dtype: str, groups: int, channel: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """x [N, D] -> (stored [N, D], f32 scales [N, groups] for 8-bit dtypes, else None); x is divided
    by `channel` [D] first when given."""
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"features.store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    kind = _TORCH[STORE_DTYPES[store_dtype]]
    if store_dtype not in _QMAX:
        return x.to(kind), None
    qmax = _QMAX[store_dtype]
    g = x.float() if channel is None else x.float() / channel
    g = g.reshape(len(x), groups, -1)
    amax = g.abs().amax(-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = (g / scale[..., None]).clamp_(-qmax, qmax)
    q = y.round_().to(kind) if store_dtype == "int8" else y.to(kind)
    return q.reshape(len(x), -1), scale


def decode(q: Tensor, scale: Tensor | None, dtype: torch.dtype, channel: Tensor | None = None) -> Tensor:
    """Inverse of `encode`, into `dtype`."""
    if scale is None:
        return q.to(dtype)
    n, groups = scale.shape
    y = (q.float().reshape(n, groups, -1) * scale[..., None]).reshape(n, -1)
    return (y if channel is None else y * channel).to(dtype)


def bytes_per_token(store_dtype: str, hidden: int) -> float:
    """Upper bound on disk per token (every final row stored), used to size shards."""
    size = _ITEMSIZE[STORE_DTYPES[store_dtype]]
    scales = 4 * 4 if store_dtype in _QMAX else 0
    return 4 * hidden * size + scales + 1


def plan_shards(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges of at most `shard_tokens` tokens (a longer sample alone)."""
    bounds, start, tokens = [], 0, 0
    for i, n in enumerate(np.asarray(lengths).tolist()):
        if tokens and tokens + n > shard_tokens:
            bounds.append((start, i))
            start, tokens = i, 0
        tokens += n
    bounds.append((start, len(lengths)))
    return bounds


# ---- files ------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shards/{index:05d}.safetensors"


def write_json(path: Path, obj: Any) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def publish(path: Path, obj: Any) -> bool:
    """Create `path` only if it does not exist (a hard link is atomic and exclusive): False if it did."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=1))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_shard(root: Path, index: int, tensors: dict[str, Tensor], seconds: float) -> dict[str, Any]:
    """Write shard `index` to a temporary file, fsync, hash, rename into place, then its record (with the
    `seconds` its features took, so a store knows what it cost however many runs wrote it)."""
    from safetensors.torch import save_file

    final = root / shard_name(index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"shard": str(index)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file: a store is often shared
    record = {"file": shard_name(index), "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
              "seconds": round(seconds, 3)}
    os.replace(tmp, final)
    write_json(final.with_suffix(".json"), record)
    return record


def shard_record(root: Path, index: int) -> dict[str, Any] | None:
    """The record of a finished shard (its file present with the recorded size), else None."""
    path = root / shard_name(index)
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return record if path.is_file() and path.stat().st_size == record["bytes"] else None


def shard_problem(root: Path, entry: dict[str, Any], full: bool = True) -> str | None:
    """Why shard `entry` (with bytes and sha256) is unusable, or None. `full=False` checks only the size."""
    path = root / entry["file"]
    if not path.is_file():
        return f"shard {path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"shard {path} is truncated or damaged: {size:,} bytes, the manifest says {entry['bytes']:,}"
    if full and sha256_file(path) != entry["sha256"]:
        return f"shard {path} is corrupted: its sha256 differs from the manifest's"
    return None


def store_identity(target_path: str, dataset, aux_layers: Sequence[int]) -> dict[str, Any]:
    """What a store's features depend on: the target's weights, tokenizer + template, the samples, the taps."""
    from draftforge.target.head import checkpoint_fingerprint

    return {"target": checkpoint_fingerprint(target_path), "target_path": str(target_path),
            "tokenizer": dataset.meta["tokenizer"], "data": dataset.key, "aux_layers": [int(i) for i in aux_layers]}


def identity_problems(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    problems = []
    if stored["target"] != wanted["target"]:
        problems.append(f"target: captured from {stored['target_path']} (fingerprint {stored['target'][:12]}), "
                        f"this run's target {wanted['target_path']} is {wanted['target'][:12]}")
    if stored["tokenizer"] != wanted["tokenizer"]:
        problems.append("tokenizer or chat template: differs from the one the store was captured with")
    elif stored["data"] != wanted["data"]:
        problems.append(f"tokenised data: store has dataset {stored['data']}, this run {wanted['data']} "
                        "(sources, max_rows, max_length, system_prompt, last_turn_only or think differ)")
    if stored["aux_layers"] != wanted["aux_layers"]:
        problems.append(f"tapped layers: store has {stored['aux_layers']}, this run {wanted['aux_layers']}")
    return problems


# ---- reading ----------------------------------------------------------------------------------------


class _Shard:
    """One shard's tensors, memory-mapped; rows are copied out only when read."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.arrays: dict[str, tuple[np.ndarray, torch.dtype]] = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            raw = (np.memmap(path, dtype=_RAW[info["dtype"]], mode="r", offset=8 + size + begin, shape=shape)
                   if end > begin else np.zeros(shape, _RAW[info["dtype"]]))
            self.arrays[name] = (raw, _TORCH[info["dtype"]])
        teacher = self.arrays["teacher"][0]
        self.teacher_start = np.concatenate([[0], np.cumsum(teacher, dtype=np.int64)])

    def rows(self, name: str, a: int, b: int) -> Tensor | None:
        if name not in self.arrays:
            return None
        raw, dtype = self.arrays[name]
        return torch.from_numpy(np.array(raw[a:b])).view(dtype)


class FeatureStore:
    """A complete store, read by sample index. Sizes are checked on open, checksums on a shard's first use."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        try:
            self.manifest: dict[str, Any] = json.loads((self.root / "manifest.json").read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.root} is not a feature store (no manifest.json); write one with "
                             "`draftforge capture`") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise StoreError(f"{self.root}: not a version-{VERSION} draftforge feature store")
        shards = self.manifest["shards"]
        if not self.manifest.get("complete"):
            done = sum(shard_record(self.root, i) is not None for i in range(len(shards)))
            raise StoreError(f"{self.root} is incomplete ({done} of {len(shards)} shards captured); "
                             "run `draftforge capture` with the same config to finish it")
        for entry in shards:
            problem = shard_problem(self.root, entry, full=False)
            if problem:
                raise StoreError(f"{problem}; run `draftforge capture --repair` with the store's config")
        self.identity: dict[str, Any] = self.manifest["identity"]
        self.layout: dict[str, Any] = self.manifest["layout"]
        self.channel = {k: torch.tensor(v) for k, v in self.manifest.get("calibration", {}).items()}
        self.lengths = np.asarray(self.manifest["samples"]["lengths"], dtype=np.int64)
        self.sample_shard = np.empty(len(self.lengths), dtype=np.int64)
        self.sample_row = np.empty(len(self.lengths), dtype=np.int64)
        for s, entry in enumerate(shards):
            a, b = entry["samples"]
            self.sample_shard[a:b] = s
            self.sample_row[a:b] = np.concatenate([[0], np.cumsum(self.lengths[a:b])[:-1]])
        self._open: dict[int, _Shard] = {}
        self._lock = threading.Lock()

    @property
    def capture_minutes(self) -> float:
        """What capturing the store cost (its shards' recorded seconds): a time budget counts it."""
        seconds = self.manifest.get("capture_seconds")
        if seconds is None:
            raise StoreError(f"{self.root}: captured before stores recorded their capture time; capture "
                             "again into a new directory to count it")
        return seconds / 60

    def __len__(self) -> int:
        return len(self.lengths)

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse a run whose target, tokenizer / template, samples or taps differ from the capture's."""
        problems = identity_problems(self.identity, identity)
        if problems:
            raise StoreError(f"feature store {self.root} was captured for a different setup:\n  "
                             + "\n  ".join(problems)
                             + "\nCapture a store for this config: "
                             "draftforge capture --config ... features.store=NEW_DIR")

    def _shard(self, s: int) -> _Shard:
        with self._lock:
            if s not in self._open:
                entry = self.manifest["shards"][s]
                problem = shard_problem(self.root, entry)
                if problem:
                    raise StoreError(f"{problem}; run `draftforge capture --repair` with the store's config")
                self._open[s] = _Shard(self.root / entry["file"])
            return self._open[s]

    def read(self, indices: Sequence[int], dtype: torch.dtype) -> TargetFeatures:
        """Features of dataset samples `indices`, right-padded with zeros to the longest (as collate pads)."""
        lengths = self.lengths[np.asarray(indices, dtype=np.int64)]
        width, hidden = self.layout["aux_width"], self.layout["hidden_size"]
        aux = torch.zeros(len(indices), int(lengths.max()), width, dtype=dtype)
        final = torch.zeros(len(indices), int(lengths.max()), hidden, dtype=dtype)
        for row, (i, n) in enumerate(zip(indices, lengths.tolist(), strict=True)):
            shard = self._shard(int(self.sample_shard[i]))
            a = int(self.sample_row[i])
            aux[row, :n] = decode(shard.rows("aux", a, a + n), shard.rows("aux_scale", a, a + n), dtype,
                                  self.channel.get("aux"))
            f0, f1 = int(shard.teacher_start[a]), int(shard.teacher_start[a + n])
            mask = shard.rows("teacher", a, a + n).bool()
            final[row, :n][mask] = decode(shard.rows("final", f0, f1), shard.rows("final_scale", f0, f1), dtype,
                                          self.channel.get("final"))
        return TargetFeatures(aux=aux, final_hidden=final)


class StoreFeatures:
    """The trainer's feature function over a store: Batch.index (positions in one of `views`, the
    train / eval splits) -> the store rows of those samples. The batch's tokens must equal the
    samples' (a batch of the other split, or data the store was not made for, never gets wrong
    features). With `follow(trainer)`, the trainer's next micro-batches are read in a background
    thread while it computes, so it does not wait on the disk."""

    def __init__(self, store: FeatureStore, views: Sequence, dtype: torch.dtype, depth: int = 2) -> None:
        self.store, self.views, self.dtype, self.depth = store, list(views), dtype, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="feature-prefetch") if depth > 0 else None
        self._pending: dict[tuple[int, ...], Future] = {}
        self._upcoming: Callable[[], list[tuple[int, ...]]] = list
        self.hits = self.misses = 0

    def follow(self, trainer) -> None:
        """Prefetch the trainer's next `depth` micro-batches on this rank (`trainer.upcoming`). A wrong
        guess costs only a read."""
        indices = np.asarray(trainer.train_set.indices)
        self._upcoming = lambda: [tuple(int(i) for i in indices[pos]) for pos in trainer.upcoming(self.depth)]

    def _resolve(self, batch) -> tuple[int, ...]:
        pos = batch.index.numpy()
        lengths = batch.attention_mask.sum(1).numpy()
        for view in self.views:
            if len(view) == 0 or pos.max() >= len(view):
                continue
            indices = np.asarray(view.indices)[pos]
            if not np.array_equal(self.store.lengths[indices], lengths):
                continue
            if all(torch.equal(view[int(p)]["input_ids"], batch.input_ids[r, :n])
                   for r, (p, n) in enumerate(zip(pos.tolist(), lengths.tolist(), strict=True))):
                return tuple(int(i) for i in indices)
        raise StoreError(f"a batch (samples {pos.tolist()[:8]}...) matches no split of the data the store "
                         f"{self.store.root} was captured for")

    def _schedule(self) -> None:
        wanted = self._upcoming() if self._pool is not None else []
        for key in [k for k in self._pending if k not in wanted]:
            self._pending.pop(key).cancel()
        for key in wanted:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self.store.read, key, self.dtype)

    def __call__(self, batch) -> TargetFeatures:
        key = self._resolve(batch)
        ready = self._pending.pop(key, None)
        self._schedule()
        if ready is not None:
            self.hits += 1
            return ready.result()
        self.misses += 1
        return self.store.read(key, self.dtype)
