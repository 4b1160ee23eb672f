"""One typed run config: a YAML file plus dotted overrides (`train.lr=3e-4`).

Unknown keys are errors, not silently ignored: a typo in a recipe must not train with defaults.
A retired key (RETIRED_KEYS) is dropped with a note, so older recipes and runs still load.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["sharegpt"])  # paths, or "sharegpt" (packaged)
    max_rows: int | None = None  # cap on conversations taken from the sources
    max_length: int = 2048  # tokens per sample; longer samples are truncated
    system_prompt: str | None = None  # default system prompt when a conversation has none
    last_turn_only: bool = False  # supervise only the last assistant turn
    think: str = "mask"  # Qwen3-style empty <think></think> blocks: "mask" or "train"
    eval_fraction: float = 0.02  # held-out share of samples for the eval split
    num_workers: int | None = None  # tokenisation processes (default: all cores)


@dataclass
class TargetConfig:
    path: str = "smollm2"  # HF directory or hub id; "smollm2" = the packaged SmolLM2-135M-Instruct
    aux_layers: list[int] | None = None  # HF hidden_states indices; default [2, N//2, N-3]
    dtype: str = "auto"  # target weights when training online: bfloat16 | float32 | float16 | auto (resolve_auto)
    trust_remote_code: bool = False  # opt-in: loading a model may otherwise never run its code


@dataclass
class DraftConfig:
    family: str = "eagle3"  # "eagle3" (TTT chain draft) or "dflash" (block draft, docs/dflash.md)
    draft_vocab_size: int = 32000
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {intermediate_size: 4096}
    init_from: str | None = None  # warm start from an exported draft directory
    head_from_target: bool = False  # lm_head = the target's rows of the draft vocabulary, norm = its final norm
    normalize_taps: bool = False  # each aux tap scaled to unit RMS (measured on the first batch); export folds it
    block_size: int = 8  # dflash: the anchor plus block_size - 1 drafted tokens (serve with K = block_size - 1)
    num_layers: int = 1  # dflash: draft layers
    mask_token_id: int | None = None  # dflash: default an unused special token of the tokenizer


@dataclass
class TrainConfig:
    out_dir: str = "runs/draft"
    ttt_steps: int = 7
    attention: str = "efficient"  # "efficient" (linear memory), "reference" (dense oracle), "flex" (CUDA)
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where it runs natively (resolve_auto)
    lr: float = 3e-4
    head_lr_scale: float = 1.0  # lr multiplier of lm_head and the final norm (lower keeps a target-initialised head)
    schedule: str = "cosine"  # after warmup: "cosine" or "linear" to min_lr_ratio, "wsd", "constant"
    min_lr_ratio: float = 0.1  # final lr as a share of lr
    decay_fraction: float = 0.2  # "wsd": the share of the steps spent decaying at the end
    budget_minutes: float | None = None  # train for this long: the step count is fixed from the measured step time
    step_decay: float = 0.8  # TTT step k's loss weighs step_decay**k
    num_anchors: int = 512  # dflash: blocks per sample (anchors drawn in assistant spans)
    block_gamma: float | None = None  # dflash: block position j weighs exp(-(j-1)/gamma); default block_size / 2
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    max_steps: int = 1000
    epochs: int | None = None  # if set, overrides max_steps
    tokens_per_batch: int = 8192  # token budget per micro-batch (length-grouped, padding counted)
    grad_accum: int = 1
    clip_grad: float = 0.5
    gradient_checkpointing: bool = False
    eval_every: int = 200
    eval_max_samples: int | None = None  # held-out evaluations read at most this many (the rest stay untrained)
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    threads: int | None = None  # torch intra-op threads per process (default: this machine's cores / its ranks)
    fsdp: bool = False  # under torchrun: shard draft weights, gradients and optimizer state (FSDP2), not DDP
    target_tp: bool = False  # under torchrun: the online target sharded over all ranks (tp_plan="auto"), no replicas


@dataclass
class FeaturesConfig:
    store: str | None = None  # feature store dir: `capture` writes it, then `train` reads it instead of a live target
    store_dtype: str = "bf16"  # bf16 | fp32 | int8 | fp8 (8-bit: e4m3 or int8 with per-row scales, half of bf16)
    shard_mb: float = 256.0  # size of one shard on disk
    capture_tokens: int = 8192  # tokens per target forward while capturing (padding counted)
    prefetch: int = 2  # micro-batches read ahead in the background when training from a store


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Keys that once existed and never changed what a run computes: ignored where an older file or run
# record has them (`train.trainer.config_changes` skips them on resume too). Key -> why it went.
RETIRED_KEYS: dict[str, str] = {
    "train.wandb": "nothing ever read it; metrics go to metrics.jsonl and TensorBoard",
}


class ConfigError(ValueError):
    """A config file or override that does not describe a valid run (reported without a traceback)."""


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    text = str(hint)
    if value is None or "Any" in text or "dict" in text:
        return value
    if "tuple" in text and isinstance(value, list):
        return tuple(value)
    if "list" in text and not isinstance(value, list):
        raise ConfigError(f"config {section}.{key}: expected a list, got {value!r}")
    for kind in (bool, int, float, str):
        if text.startswith(kind.__name__) or text == f"<class '{kind.__name__}'>":
            if kind is float and isinstance(value, str):
                try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                    return float(value)
                except ValueError:
                    pass
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if kind is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"config {section}.{key}: expected {kind.__name__}, got {value!r}")
            return value
    return value


def _apply(config: RunConfig, tree: dict[str, Any], origin: str) -> None:
    for section, values in tree.items():
        if not hasattr(config, section) or not isinstance(values, dict):
            raise ConfigError(f"{origin}: unknown config section {section!r}")
        target = getattr(config, section)
        hints = get_type_hints(type(target))
        for key, value in values.items():
            if f"{section}.{key}" in RETIRED_KEYS:
                print(f"draftforge: {origin}: {section}.{key} is no longer a setting and is ignored "
                      f"({RETIRED_KEYS[f'{section}.{key}']})", file=sys.stderr)  # fmt: skip
                continue
            if key not in hints:
                raise ConfigError(f"{origin}: unknown key {section}.{key}")
            setattr(target, key, _coerce(section, key, value, hints[key]))


def run_config(tree: dict[str, Any], origin: str) -> RunConfig:
    """A RunConfig from sections already in memory (a recipe being written), checked as a file's are."""
    config = RunConfig()
    _apply(config, tree, origin)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML file and `section.key=value` overrides."""
    config = RunConfig()
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        tree.pop("recipe", None)  # a recipe's notes for people (draftforge.recipe), not part of the run
        config = run_config(tree, str(path))
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(config, {section: {key: yaml.safe_load(raw)}}, f"override {item!r}")
    if config.train.eval_max_samples is not None and config.train.eval_max_samples < 1:
        raise ConfigError(f"train.eval_max_samples must be at least 1, got {config.train.eval_max_samples}")
    return resolve_auto(config)


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively where this process trains: CUDA, or a CPU with bf16
    instructions (AVX512-BF16, AMX). Elsewhere oneDNN emulates them: on an AVX2 EPYC a bf16 GEMM ran
    at 1.2 GFLOP/s against float32's 112, so a bf16 recipe there trains about 100x slower."""
    import torch

    return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_auto(config: RunConfig) -> RunConfig:
    """`train.precision` and `target.dtype` made concrete for this machine, so runs, checkpoints and
    stores record what was used: `auto` is bf16 where it runs natively (native_bf16), else float32."""
    train, target = config.train, config.target
    if train.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {train.precision!r}")
    if target.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"target.dtype must be auto, bfloat16, float16 or float32, got {target.dtype!r}")
    if "auto" in (train.precision, target.dtype):
        native = native_bf16()
        if train.precision == "auto":
            train.precision = "bf16" if native else "fp32"
        if target.dtype == "auto":
            target.dtype = "bfloat16" if native else "float32"
    return config


def load_recipe(path: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """(run config, `recipe:` section) of a recipe file (`draftforge recipe` writes them); the run config is
    what `draftforge train --config` gets. Here, beside load_config, so any layer may size or list a recipe."""
    return load_config(path), (yaml.safe_load(Path(path).read_text()) or {}).get("recipe") or {}
