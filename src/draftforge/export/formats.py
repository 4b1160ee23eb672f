"""Export a trained draft in the layouts SGLang and vLLM load unchanged, and check any draft dir.

`sglang` and `vllm` share one directory layout (docs/design.md §6): Llama-style config with
`LlamaForCausalLMEagle3`, aux taps written in both conventions (SGLang's `eagle_config` counts
"output of layer i" = HF index - 1; vLLM's top-level field uses the HF index), and the draft's
weights under `midlayer.*` without the embedding. `speculators` is vLLM's native format with
`layers.0.*` names and an explicit `norm_before_residual: false`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import fold_tap_scales
from draftforge.export.findings import Finding, check_vocab_map, tensor_layout
from draftforge.layouts import (
    MIDLAYER,
    SPECULATORS_LAYER,
    eagle3_layer,
    is_dflash,
)
from draftforge.target.base import DTYPES
from draftforge.train.checkpoint import latest_checkpoint, trainer_state

FORMATS = ("sglang", "vllm", "speculators")
EAGLE3_ARCHS = {"LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM"}


def expected_shapes(cfg: DraftModelConfig, prefix: str = MIDLAYER) -> dict[str, tuple[int, ...]]:
    """Every tensor an engine loads for an EAGLE-3 Llama draft, with its shape."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "fc.weight": (h, 3 * cfg.target_hidden_size),
        f"{prefix}self_attn.q_proj.weight": (q, 2 * h),
        f"{prefix}self_attn.k_proj.weight": (kv, 2 * h),
        f"{prefix}self_attn.v_proj.weight": (kv, 2 * h),
        f"{prefix}self_attn.o_proj.weight": (h, q),
        f"{prefix}mlp.gate_proj.weight": (i, h),
        f"{prefix}mlp.up_proj.weight": (i, h),
        f"{prefix}mlp.down_proj.weight": (h, i),
        f"{prefix}input_layernorm.weight": (h,),
        f"{prefix}hidden_norm.weight": (h,),
        f"{prefix}post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (cfg.draft_vocab_size, h),
        "d2t": (cfg.draft_vocab_size,),
        "t2d": (cfg.vocab_size,),
    }


def llama_config(cfg: DraftModelConfig, dtype: str) -> dict[str, Any]:
    """The Llama-style config both engines parse for the single draft layer."""
    out: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    if cfg.target_hidden_size != cfg.hidden_size:
        out["target_hidden_size"] = cfg.target_hidden_size
    return out


def export_config(cfg: DraftModelConfig, fmt: str, dtype: str, target: str, steps: int = 3) -> dict[str, Any]:
    hf_ids = list(cfg.aux_layer_ids)
    if fmt in ("sglang", "vllm"):
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            **llama_config(cfg, dtype),
            "eagle_config": {
                "use_aux_hidden_state": True,
                "eagle_aux_hidden_state_layer_ids": [i - 1 for i in hf_ids],  # SGLang: output of layer i
            },
            "eagle_aux_hidden_state_layer_ids": hf_ids,  # vLLM: HF hidden_states index
        }
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": hf_ids,
        "transformer_layer_config": {"architectures": ["LlamaForCausalLM"], **llama_config(cfg, dtype)},
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": steps}],
            "verifier": {"name_or_path": target, "architectures": ["LlamaForCausalLM"]},
        },
        "torch_dtype": dtype,
    }


def launch_readme(out: Path, fmt: str, target: str, steps: int = 3) -> str:
    spec = json.dumps({"method": "eagle3", "model": str(out), "num_speculative_tokens": steps})
    sglang = (
        f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 \\\n"
        f"    --speculative-draft-model-path {out} --speculative-num-steps {steps} \\\n"
        f"    --speculative-eagle-topk 1 --speculative-num-draft-tokens {steps + 1}"
    )
    vllm = f"vllm serve {target} --speculative-config '{spec}'"
    body = f"# EAGLE-3 draft for {target} ({fmt} layout, exported by draftforge)\n\n"
    if fmt != "speculators":
        body += f"SGLang:\n\n```\n{sglang}\n```\n\n"
    body += f"vLLM:\n\n```\n{vllm}\n```\n\nCheck it: `draftforge export --check {out}`\n"
    return body


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "trainer_state.json").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise SystemExit(f"{path}: no checkpoint found (expected model.safetensors + trainer_state.json)")
    return latest


def is_dflash_checkpoint(state: dict) -> bool:
    """A checkpoint's trainer_state.json holds a DFlash draft (one engine layout, read by vLLM and SGLang alike)."""
    return state["draft_config"].get("family") == "dflash"


def export_draft(ckpt: str | Path, fmt: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    state = trainer_state(ckpt)
    target = state.get("identity", {}).get("target_name") or state.get("identity", {}).get("target", "TARGET")
    weights = load_file(ckpt / "model.safetensors")
    if is_dflash_checkpoint(state):
        from draftforge.draft.dflash_config import DFlashConfig
        from draftforge.export.dflash_export import export_dflash

        if fmt == "speculators":
            raise ValueError("a DFlash draft has no speculators layout; use --format vllm (or sglang, the same)")
        return export_dflash(DFlashConfig.from_dict(state["draft_config"]), weights, out, dtype, target)
    cfg = DraftModelConfig.from_dict(state["draft_config"])
    weights["fc.weight"] = fold_tap_scales(weights["fc.weight"], cfg)  # engines read the taps unscaled
    tensors: dict[str, torch.Tensor] = {}
    for name in expected_shapes(cfg):
        tensor = weights[name]
        if tensor.is_floating_point():
            tensor = tensor.to(DTYPES[dtype])
        if fmt == "speculators":
            name = name.replace(MIDLAYER, SPECULATORS_LAYER)
        tensors[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(export_config(cfg, fmt, dtype, target), indent=2) + "\n")
    (out / "README.md").write_text(launch_readme(out.resolve(), fmt, target))
    return out


# ---- check ----------------------------------------------------------------------------------------
def check_draft_dir(path: str | Path, target_config: dict[str, Any] | None = None) -> list[Finding]:
    """What SGLang or vLLM would reject or silently misread in a draft directory."""
    path = Path(path)
    found: list[Finding] = []
    err = lambda m: found.append(Finding("error", m))
    note = lambda m: found.append(Finding("note", m))
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return [Finding("error", f"{path}/config.json is missing")]
    except json.JSONDecodeError as e:
        return [Finding("error", f"{path}/config.json is not valid JSON: {e}")]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return [Finding("error", f"{path}: no *.safetensors weights (engines never load pickle files here)")]
    from draftforge.export.dflash_export import check_dflash_dir

    if is_dflash(config):
        return check_dflash_dir(path, config, files, target_config)
    layer, prefix = eagle3_layer(config)
    archs = config.get("architectures") or []
    if config.get("speculators_model_type") == "eagle3":
        if config.get("norm_before_residual") is None:
            err("speculators config lacks norm_before_residual: vLLM defaults it to true, which is not this draft")
        if not (config.get("speculators_config") or {}).get("verifier", {}).get("name_or_path"):
            err("speculators_config.verifier.name_or_path is missing: vLLM rejects the config")
    elif not set(archs) & EAGLE3_ARCHS:
        err(f"architectures {archs} is not an EAGLE-3 Llama draft ({sorted(EAGLE3_ARCHS)})")
    if layer.get("num_hidden_layers", 1) != 1:
        err(f"num_hidden_layers={layer.get('num_hidden_layers')}: the EAGLE-3 draft has exactly one layer")
    if layer.get("tie_word_embeddings", False):
        err("tie_word_embeddings is true: the draft lm_head (draft vocab) is not the embedding")
    if "draft_vocab_size" not in layer:
        err("draft_vocab_size is missing: engines then assume the full vocabulary and misread lm_head/d2t")

    tensors = tensor_layout(files)

    try:
        cfg = DraftModelConfig(
            hidden_size=layer["hidden_size"],
            num_attention_heads=layer["num_attention_heads"],
            num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
            head_dim=layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"],
            intermediate_size=layer["intermediate_size"],
            rms_norm_eps=layer.get("rms_norm_eps", 1e-6),
            rope_theta=layer.get("rope_theta", 10000.0),
            rope_scaling=layer.get("rope_scaling"),
            max_position_embeddings=layer.get("max_position_embeddings", 2048),
            vocab_size=layer["vocab_size"],
            draft_vocab_size=layer.get("draft_vocab_size", layer["vocab_size"]),
            target_hidden_size=layer.get("target_hidden_size", layer["hidden_size"]),
            aux_layer_ids=[0, 0, 0],
        )
    except (KeyError, ValueError, TypeError) as e:
        err(f"config cannot describe a draft layer: {e}")
        return found
    expect = expected_shapes(cfg, prefix)
    for name, shape in expect.items():
        if name not in tensors:
            err(f"missing weight {name} {list(shape)}")
        elif tensors[name][0] != shape:
            err(f"{name} has shape {list(tensors[name][0])}, config implies {list(shape)}")
    for name in sorted(set(tensors) - set(expect)):
        if name.endswith("embed_tokens.weight"):
            note(f"{name} is present: engines share the target's embedding, this copy is unused or overrides it")
        else:
            err(f"unexpected weight {name}: engines warn or fail on unknown weights")
    if "d2t" in tensors and tensors["d2t"][1] not in ("I64", "I32"):
        err(f"d2t has dtype {tensors['d2t'][1]}; engines index with it as int64 offsets")
    if "t2d" in tensors and tensors["t2d"][1] != "BOOL":
        err(f"t2d has dtype {tensors['t2d'][1]}; engines expect a bool mask")
    if {"d2t", "t2d"} <= set(tensors) and not any(f.message.startswith(("d2t", "t2d")) for f in found):
        found += check_vocab_map(files, cfg)

    top = config.get("eagle_aux_hidden_state_layer_ids")
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if config.get("speculators_model_type") != "eagle3":
        if top is None:
            err("top-level eagle_aux_hidden_state_layer_ids is missing: vLLM silently uses its default taps")
        if nested is None:
            err("eagle_config.eagle_aux_hidden_state_layer_ids is missing: SGLang silently uses its default taps")
        if top is not None and nested is not None and [i - 1 for i in top] != list(nested):
            err(
                f"aux ids disagree: top-level {top} (vLLM, HF index) vs eagle_config {nested} "
                "(SGLang, HF index - 1); one of them is in the wrong convention"
            )
    if target_config is not None:
        found += _check_against_target(layer, top, target_config)
    return found


def _check_against_target(layer: dict[str, Any], top: list[int] | None, target: dict[str, Any]) -> list[Finding]:
    target = target.get("text_config", target)
    found = []
    if layer.get("max_position_embeddings", 0) < target.get("max_position_embeddings", 0):
        found.append(Finding("error", (
            f"max_position_embeddings={layer.get('max_position_embeddings')} is smaller than the target's "
            f"{target['max_position_embeddings']}: engines cap the context or mis-rotate long prompts")))
    if layer.get("vocab_size") != target.get("vocab_size"):
        found.append(Finding("error", f"vocab_size {layer.get('vocab_size')} != target's {target.get('vocab_size')}"))
    if layer.get("target_hidden_size", layer.get("hidden_size")) != target.get("hidden_size"):
        found.append(Finding("error", f"fc expects target hidden size "
                                      f"{layer.get('target_hidden_size', layer.get('hidden_size'))}, "
                                      f"target has {target.get('hidden_size')}"))
    n = target.get("num_hidden_layers", 0)
    if top is not None and not all(0 <= i < n for i in top):
        found.append(Finding("error", f"aux ids {top} are outside the target's 0..{n - 1} layers"))
    return found


# ---- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", help="checkpoint dir, or a run dir (its latest checkpoint)")
    parser.add_argument("--format", choices=FORMATS, default="sglang", help="sglang and vllm share one layout")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--check", metavar="DIR", help="check a draft directory (ours or a third party's)")
    parser.add_argument("--target", help="with --check: the target's dir (or config.json) to compare against")


def run(args: argparse.Namespace) -> int:
    if args.check:
        target = None
        if args.target:
            from draftforge.assets import resolve_model_path

            tpath = Path(resolve_model_path(args.target))
            target = json.loads((tpath / "config.json" if tpath.is_dir() else tpath).read_text())
        findings = check_draft_dir(args.check, target)
        for f in findings:
            print(f"{f.level.upper():5} {f.message}")
        errors = sum(f.level == "error" for f in findings)
        print(f"{args.check}: {'clean' if not errors else f'{errors} problem(s)'}")
        return 1 if errors else 0
    if not args.ckpt or not args.out:
        print("export needs CKPT and --out (or --check DIR)", file=sys.stderr)
        return 2
    out = export_draft(args.ckpt, args.format, args.out, args.dtype)
    problems = [f for f in check_draft_dir(out) if f.level == "error"]
    for f in problems:
        print(f"ERROR {f.message}", file=sys.stderr)
    print(f"exported {args.format} draft to {out} ({'clean' if not problems else 'NOT clean'})")
    return 1 if problems else 0
