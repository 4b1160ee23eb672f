"""Turn a RunConfig into a ready Trainer: data, vocabulary, target, draft, and the feature source:
the live target (online), or a feature store (`features.store`) with only the target's lm_head and
embedding loaded. The Trainer gets a features function either way and cannot tell which."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from draftforge.config import RunConfig
from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import Eagle3Draft
from draftforge.target.hf import HFTarget
from draftforge.train.trainer import Batch, Trainer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class DatasetView:
    """A subset of a tokenised dataset by sample index (the train / eval split)."""

    def __init__(self, dataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(dataset.lengths)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]


def split_eval(ids: list[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Held-out samples chosen by a hash of their id: stable when the data grows or is reordered."""
    if fraction <= 0:
        return np.arange(len(ids)), np.arange(0)
    bucket = np.array([int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids])
    held = bucket < fraction
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def warm_start(draft: Eagle3Draft, path: str | Path) -> None:
    """Load an exported draft dir (ours, SGLang layout, or speculators) into the draft to fine-tune it."""
    import json

    from safetensors.torch import load_file

    from draftforge.export.formats import aux_layer_ids_of

    config_file = Path(path) / "config.json"
    taps = aux_layer_ids_of(json.loads(config_file.read_text())) if config_file.exists() else None
    if taps is not None and taps != draft.config.aux_layer_ids:
        raise SystemExit(f"{path}: the draft was trained on aux taps {taps}, this run taps "
                         f"{draft.config.aux_layer_ids}; set target.aux_layers to match")
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update({k.replace("layers.0.", "midlayer."): v for k, v in load_file(f).items()})
    state.pop("embed_tokens.weight", None)
    own = draft.state_dict()
    bad = [f"{k} {list(v.shape)} vs {list(own[k].shape) if k in own else 'none'}"
           for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = sorted(set(own) - set(state) - {"embed_tokens.weight"})
    if bad or missing:
        raise SystemExit(f"{path}: cannot warm-start this draft (mismatched {bad}, missing {missing})")
    draft.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def build_training(config: RunConfig) -> Trainer:
    from draftforge.data.template import load_tokenizer
    from draftforge.data.tokenized import build_tokenized
    from draftforge.data.vocab import build_vocab

    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    torch.manual_seed(config.train.seed)
    tokenizer = load_tokenizer(config.target.path)
    dataset = build_tokenized(config.data, tokenizer, config.target.path)
    train_idx, eval_idx = split_eval(list(dataset.ids), config.data.eval_fraction)
    train_set, eval_set = DatasetView(dataset, train_idx), DatasetView(dataset, eval_idx)

    dtype, store = DTYPES[config.target.dtype], None
    if config.features.store:
        from draftforge.features.store import FeatureStore, StoreFeatures, store_identity
        from draftforge.target.head import HeadOnlyTarget

        target = HeadOnlyTarget.from_pretrained(
            config.target.path, config.target.aux_layers, dtype, config.target.trust_remote_code
        )
        store = FeatureStore(config.features.store)
        store.check(store_identity(config.target.path, dataset, target.aux_layers))
        features = StoreFeatures(store, [train_set, eval_set], dtype, config.features.prefetch)
    else:
        target = HFTarget.from_pretrained(config.target.path, config.target.aux_layers, dtype,
                                          config.target.trust_remote_code)

        def features(batch: Batch):
            return target.features(batch.input_ids, batch.attention_mask)

    draft_cfg = DraftModelConfig.from_target_config(
        target.config, config.draft.draft_vocab_size, target.aux_layers, config.draft.overrides
    )
    draft = Eagle3Draft(draft_cfg)
    draft.load_target_embedding(target.embed_weight.float())
    if config.draft.init_from:
        warm_start(draft, config.draft.init_from)
    else:
        vocab = build_vocab(train_set, draft_cfg.vocab_size, draft_cfg.draft_vocab_size)
        print(f"draft vocabulary: {draft_cfg.draft_vocab_size:,} tokens cover {vocab.coverage:.1%} "
              f"of supervised target tokens")
        draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    print(f"data: {len(train_set):,} train / {len(eval_set):,} eval samples, "
          f"{int(train_set.lengths.sum()):,} train tokens")

    identity = {
        "target": config.target.path,
        "target_name": getattr(target.config, "name_or_path", config.target.path),
        "data": dataset.key,
        "aux_layers": target.aux_layers,
    }
    trainer = Trainer(config, draft, target.head, features, train_set, eval_set, identity)
    if store is not None:
        features.follow(trainer)  # read the trainer's next batches in the background
    return trainer
