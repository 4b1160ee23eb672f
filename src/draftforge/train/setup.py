"""Turn a RunConfig into a ready Trainer: data, vocabulary, target, draft, and the feature source:
the live target (online), or a feature store (`features.store`) with only the target's lm_head and
embedding loaded. The Trainer gets a features function either way and cannot tell which.

Under torchrun every rank builds the same draft, vocabulary and data order (all deterministic) on
its device; the online target is a replica per rank, or one model sharded over all ranks
(`train.target_tp`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from draftforge.config import RunConfig, native_bf16
from draftforge.data.batch import Batch, collate
from draftforge.data.split import split_eval
from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import Eagle3Draft
from draftforge.layouts import MIDLAYER, SPECULATORS_LAYER, aux_layer_ids_of
from draftforge.target.base import DTYPES, TargetHead
from draftforge.target.hf import HFTarget
from draftforge.train.dflash_setup import build_dflash, check_family, target_taps
from draftforge.train.distributed import Dist, in_turn, init_distributed, local
from draftforge.train.trainer import Trainer


class DatasetView:
    """A subset of a tokenised dataset by sample index (the train / eval split)."""

    def __init__(self, dataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(dataset.lengths)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]


def warm_start(draft: Eagle3Draft, path: str | Path) -> None:
    """Load an exported draft dir (ours, SGLang layout, or speculators) into the draft to fine-tune it."""
    import json

    from safetensors.torch import load_file

    config_file = Path(path) / "config.json"
    taps = aux_layer_ids_of(json.loads(config_file.read_text())) if config_file.exists() else None
    if taps is not None and taps != draft.config.aux_layer_ids:
        raise SystemExit(f"{path}: the draft was trained on aux taps {taps}, this run taps "
                         f"{draft.config.aux_layer_ids}; set target.aux_layers to match")
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update({k.replace(SPECULATORS_LAYER, MIDLAYER): v for k, v in load_file(f).items()})
    state.pop("embed_tokens.weight", None)
    own = draft.state_dict()
    bad = [f"{k} {list(v.shape)} vs {list(own[k].shape) if k in own else 'none'}"
           for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = sorted(set(own) - set(state) - {"embed_tokens.weight"})
    if bad or missing:
        raise SystemExit(f"{path}: cannot warm-start this draft (mismatched {bad}, missing {missing})")
    draft.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def load_target(config: RunConfig, dtype: torch.dtype, ctx: Dist, taps: list[int] | None) -> HFTarget:
    """The online target on this rank's device: a full replica, or this rank's tensor-parallel shard
    (transformers' tp_plan="auto") with the lm_head and embedding gathered whole (the teacher and
    the draft need all of them)."""
    if not (config.train.target_tp and ctx.world > 1):
        target = HFTarget.from_pretrained(config.target.path, taps, dtype, config.target.trust_remote_code)
        target.model.to(ctx.device)
        return target
    from transformers import AutoModelForCausalLM, DistributedConfig

    from draftforge.assets import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(config.target.path), dtype=dtype, trust_remote_code=config.target.trust_remote_code,
        distributed_config=DistributedConfig(tp_plan="auto"),
    )
    target = HFTarget(model, taps)
    gain = target.head.norm_gain
    target.head = TargetHead(local(target.head.weight.detach()), target.head.logit_softcap,
                             None if gain is None else local(gain))
    target.embed_weight = local(target.embed_weight.detach())
    return target


def tap_scales(aux: torch.Tensor, attention_mask: torch.Tensor, ctx: Dist) -> list[float]:
    """Per-tap scales bringing each tap's RMS over the batch's tokens (all ranks') near 1. They are
    powers of two, so fc(aux * scale) and the exported fc with the scales folded in agree exactly."""
    taps = aux[attention_mask.bool().to(aux.device)].float().view(-1, 3, aux.shape[-1] // 3)
    sums = ctx.sum(torch.cat([taps.pow(2).sum((0, 2)).double(), taps.new_tensor([taps[:, 0].numel()]).double()]))
    rms = (sums[:3] / sums[3].clamp(min=1)).sqrt().cpu()
    return [2.0 ** -round(float(r.clamp(min=1e-12).log2())) for r in rms]


def build_training(config: RunConfig) -> Trainer:
    from draftforge.data.template import load_tokenizer
    from draftforge.data.tokenized import build_tokenized
    from draftforge.data.vocab import build_vocab

    check_family(config)
    ctx = init_distributed()
    say = print if ctx.main else lambda *a, **k: None
    torch.set_num_threads(config.train.threads or max(1, len(os.sched_getaffinity(0)) // ctx.local_world))
    torch.manual_seed(config.train.seed)
    if (config.train.precision == "bf16" or config.target.dtype == "bfloat16") and not native_bf16():
        say("warning: bf16 is emulated on this CPU (no AVX512-BF16 / AMX), about 100x slower than float32: "
            "set train.precision=auto target.dtype=auto (or fp32 / float32)")
    tokenizer = load_tokenizer(config.target.path)
    dataset = build_tokenized(config.data, tokenizer, config.target.path, progress=ctx.main)
    train_idx, eval_idx = split_eval(list(dataset.ids), config.data.eval_fraction)
    eval_idx = eval_idx[: config.train.eval_max_samples]  # None: all; evaluations cost minutes of a budget
    train_set, eval_set = DatasetView(dataset, train_idx), DatasetView(dataset, eval_idx)

    dtype, store, taps = DTYPES[config.target.dtype], None, target_taps(config)
    if config.features.store:
        from draftforge.features.store import FeatureStore, StoreFeatures, store_identity
        from draftforge.target.head import HeadOnlyTarget

        target = HeadOnlyTarget.from_pretrained(config.target.path, taps, dtype, config.target.trust_remote_code)
        target.head.weight = target.head.weight.to(ctx.device)
        store = FeatureStore(config.features.store)
        store.check(store_identity(config.target.path, dataset, target.aux_layers))
        features = StoreFeatures(store, [train_set, eval_set], dtype, config.features.prefetch)
    else:
        target = load_target(config, dtype, ctx, taps)
        if config.train.target_tp and ctx.world > 1:
            features = in_turn(target.features, ctx)  # a collective: each rank's batch through the shards
        else:

            def features(batch: Batch):
                return target.features(batch.input_ids.to(ctx.device), batch.attention_mask.to(ctx.device))

    objective = None  # the trainer's default: EAGLE-3's TTT unroll
    if config.draft.family == "dflash":
        draft, objective = build_dflash(config, target, tokenizer, say)
    else:
        draft = Eagle3Draft(DraftModelConfig.from_target_config(
            target.config, config.draft.draft_vocab_size, target.aux_layers, config.draft.overrides))
        draft.load_target_embedding(target.embed_weight.float())
    draft_cfg = draft.config
    if config.draft.init_from:
        warm_start(draft, config.draft.init_from)
    else:
        vocab = build_vocab(train_set, draft_cfg.vocab_size, draft_cfg.draft_vocab_size)
        say(f"draft vocabulary: {draft_cfg.draft_vocab_size:,} tokens cover {vocab.coverage:.1%} "
            f"of supervised target tokens")
        draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
        if config.draft.head_from_target:
            if target.head.norm_gain is None:
                raise SystemExit(f"{config.target.path}: no final norm weight found; set draft.head_from_target=false")
            draft.head_from_target(target.head.weight.float(), target.head.norm_gain.float())
    draft.to(ctx.device)
    say(f"data: {len(train_set):,} train / {len(eval_set):,} eval samples, "
        f"{int(train_set.lengths.sum()):,} train tokens" + (f", {ctx.world} ranks" if ctx.world > 1 else ""))

    identity = {
        "target": config.target.path,
        "target_name": getattr(target.config, "name_or_path", config.target.path),
        "data": dataset.key,
        "aux_layers": target.aux_layers,
    }
    trainer = Trainer(config, draft, target.head, features, train_set, eval_set, identity, ctx, objective)
    if config.draft.normalize_taps and not config.draft.init_from:  # a resume restores the run's own scales
        batch = collate(train_set, trainer.upcoming(1)[0])
        draft.set_tap_scales(tap_scales(features(batch).aux, batch.attention_mask, ctx))
        say(f"aux taps scaled by {draft.config.tap_scales} (unit RMS; folded into fc on export)")
    if store is not None:
        features.follow(trainer)  # read the trainer's next batches in the background
    return trainer
