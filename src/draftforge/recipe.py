"""Write a training recipe for any Hugging Face target from its config.json, or check recipe files.

    draftforge recipe path/to/config.json --target org/Model --out recipes/model.yaml
    draftforge recipe --check recipes/*.yaml

A recipe is a run config (`data`, `target`, `draft`, `train`, `features`: what `draftforge train
--config` reads) plus a `recipe:` section for people: the target's config facts, the tapped layers
and why, the derived draft shape and every override with its reason, the data and training plan,
the hardware it needs (training sized by `train.memory_model`, see `train_plan`) and the exact SGLang / vLLM
commands that serve the exported draft.
`load_recipe` splits the two; the trainer never sees `recipe:`.

Family quirks applied from the config alone: MoE (the draft's MLP takes the target's dense MLP
width, or 3.5 x hidden when the config only defines an expert width), multi-head latent attention
(the draft layer is plain GQA), hybrid linear attention (taps move to the nearest full-attention
layer), sliding / chunked windows and NoPE layers (noted: the draft attends fully with RoPE), RoPE
scaling copied, partial rotary dropped, tied embeddings noted, the draft vocabulary capped at the
target's, custom code (trust_remote_code) when transformers does not know the model type.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from draftforge.config import ConfigError, RunConfig, load_recipe, run_config
from draftforge.draft.config import DraftModelConfig
from draftforge.target.facts import (
    estimate_params,
    experts,
    hf_view,
    is_mla,
    known_model_type,
    linear_layers,
    mlp_kinds,
    read_config,
    target_facts,
    weight_bytes,
)
from draftforge.target.taps import default_aux_layers
from draftforge.train.memory_model import GIB, fits, recipe_memory, recipe_settings, usable_gib

DRAFT_VOCAB = 32000  # covers nearly all assistant tokens of a 100k-250k vocabulary (EAGLE-3, SpecForge)
MLP_RATIO = 3.5  # Llama-3's 14336 / 4096: the draft MLP when the target defines no dense width
TOKENS_PER_CONVERSATION = 1000  # regenerated ShareGPT / UltraChat conversations at max_length 2048
ROWS = {True: 100_000, False: 40_000}  # conversations online / offline (a store holds 8 x hidden bytes per token)
GPU_GB, BIG_GPU_GB, HEADROOM = 80.0, 141.0, 1.2  # serving: H100, H200; weights x 1.2 leaves room for the KV cache
# Where a draft trains, in the order tried (GPU, online, gradient checkpointing): one 80 GB GPU with the target
# online as written, then checkpointed; offline (the target captured once to a store) likewise; then one 141 GB GPU.
TRAIN_SETTINGS = (("80 GB (H100)", True, False), ("80 GB (H100)", True, True), ("80 GB (H100)", False, False),
                  ("80 GB (H100)", False, True), ("141 GB (H200)", False, False), ("141 GB (H200)", False, True))

CHAT_NOTES: dict[str, str] = {
    "llama": "Llama-3 header template (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>). Without a "
             "system message the template still renders a default system block (knowledge cutoff and today's "
             "date): the server renders it the same way, keep it. No thinking mode.",
    "llama4_text": "Llama-4 template (<|header_start|>role<|header_end|> ... <|eot|>), no default system prompt, "
                   "no thinking mode. The checkpoint is multimodal: train on text; image tokens never reach the "
                   "draft in text serving.",
    "qwen3": "ChatML (<|im_start|>role ... <|im_end|>). Hybrid thinking: enable_thinking=True (the default) answers "
             "with a <think>...</think> block, False renders an empty <think></think> first. Regenerate in the mode "
             "you serve (`draftforge regenerate --reasoning on|off`); an empty think block is not supervised "
             "(data.think: mask). No default system prompt.",
    "qwen3_next": "ChatML (<|im_start|>role ... <|im_end|>). The Instruct checkpoint never thinks (the Thinking "
                  "checkpoint always does: a separate draft). No default system prompt.",
    "gpt_oss": "harmony format: the system message carries 'Reasoning: low|medium|high' (medium by default) and "
               "every answer is an 'analysis' channel (chain of thought) then a 'final' channel. Engines speculate "
               "on both: regenerate at the reasoning effort you serve and keep reasoning_content so the draft "
               "learns the analysis text too.",
    "deepseek_v3": "DeepSeek-V3 template (<｜User｜> ... <｜Assistant｜> ... <｜end▁of▁sentence｜>), no default system "
                   "prompt. V3 / V3-0324 never think; V3.1 finetunes toggle thinking with a <think> / </think> "
                   "prefix after <｜Assistant｜>: regenerate in the mode you serve.",
    "kimi_k2": "Kimi template (<|im_system|>, <|im_user|>, <|im_assistant|> ... <|im_middle|> ... <|im_end|>); "
               "without a system message it inserts 'You are Kimi, an AI assistant created by Moonshot AI.'. "
               "No thinking mode (K2-Instruct). The tokenizer is tiktoken-based custom code: trust_remote_code.",
    "bailing_moe": "Ling template (<role>SYSTEM</role>... 'detailed thinking off'<|role_end|>, <role>HUMAN</role>, "
                   "<role>ASSISTANT</role>); the system turn is always rendered and thinking is hard-wired off "
                   "(Ring is the thinking sibling). Custom code: trust_remote_code.",
    "phi3": "Phi-4 ChatML variant (<|im_start|>role<|im_sep|> ... <|im_end|>), no default system prompt, no "
            "thinking mode (Phi-4-reasoning is a separate checkpoint).",
    "gemma3_text": "Gemma turns (<start_of_turn>user / model ... <end_of_turn>); there is no system role: a system "
                   "message is prepended to the first user turn. No thinking mode. The -it checkpoint is "
                   "multimodal: train on text.",
    "mistral": "Mistral V7-Tekken template ([SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]). Mistral-Small "
               "ships a default system prompt (SYSTEM_PROMPT.txt) that its serving recipes pass: set the same text "
               "as data.system_prompt so training renders what serving renders. No thinking mode.",
}
CHAT_NOTES["qwen3_moe"] = CHAT_NOTES["qwen3"]
CHAT_NOTES["gemma2"] = CHAT_NOTES["gemma3_text"]
DEFAULT_CHAT_NOTE = ("Use the target's own chat template (tokenizer_config.json). Regenerate the answers with the "
                     "target served exactly as in production (template, system prompt, reasoning setting).")


# ---- what the recipe decides ------------------------------------------------------------------------
def choose_taps(facts: dict[str, Any]) -> tuple[list[int], str]:
    """Low / mid / high taps (HF hidden_states index); in hybrids moved to the nearest full-attention layer."""
    n = int(facts["num_hidden_layers"])
    taps = default_aux_layers(n)
    why = f"default low / mid / high taps [2, N//2, N-3] for N={n} decoder layers"
    linear = set(linear_layers(facts))
    if not linear:
        return taps, why
    allowed = [i for i in range(n) if i not in linear]
    if len(allowed) < 3:
        raise ConfigError(f"only {len(allowed)} full-attention layers: EAGLE-3 needs three taps")
    moved: list[int] = []
    for t in taps:  # nearest allowed, ties to the lower index, never twice the same layer
        moved.append(min((i for i in allowed if i not in moved), key=lambda i: (abs(i - t), i)))
    why += (f"; {len(linear)} of the {n} layers are linear attention (layer_types), which engines cannot tap, "
            f"so {taps} moved to the nearest full-attention layers {moved}")
    return moved, why


def draft_overrides(facts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Deliberate deviations from the target's shape, each with its reason."""
    overrides: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    if is_mla(facts):
        hd = int(facts.get("v_head_dim") or 128)
        heads = int(facts["hidden_size"]) // hd
        kv = max(d for d in range(1, min(heads, 8) + 1) if heads % d == 0)
        overrides.update(head_dim=hd, num_attention_heads=heads, num_key_value_heads=kv)
        why = (f"multi-head latent attention has no Llama counterpart (per-head q/k {facts.get('qk_nope_head_dim')}"
               f"+{facts.get('qk_rope_head_dim')}, v {facts.get('v_head_dim')}); the draft layer is plain GQA: "
               f"head_dim = v_head_dim {hd}, {heads} heads (= hidden / head_dim), {kv} KV heads")
        reasons.update(head_dim=why, num_attention_heads="plain GQA for an MLA target: see head_dim",
                       num_key_value_heads="plain GQA for an MLA target: see head_dim")
    if experts(facts):
        h = int(facts["hidden_size"])
        if facts.get("intermediate_size_mlp"):
            width, why = int(facts["intermediate_size_mlp"]), "the target's dense MLP width (intermediate_size_mlp)"
        elif facts.get("moe_intermediate_size"):
            width, why = int(facts["intermediate_size"]), "the target's dense MLP width (intermediate_size)"
        else:
            width = 256 * math.ceil(MLP_RATIO * h / 256)
            why = (f"intermediate_size {facts['intermediate_size']} is one expert's width and the target has no "
                   f"dense MLP; one dense SwiGLU that narrow underfits, so {MLP_RATIO} x hidden (Llama-3's ratio) "
                   f"rounded up to 256")
        if width != int(facts["intermediate_size"]):
            overrides["intermediate_size"] = width
            reasons["intermediate_size"] = f"MoE target ({experts(facts)} experts): {why} = {width}"
    return overrides, reasons


def derive_draft(facts: dict[str, Any], taps: list[int], draft_vocab: int,
                 overrides: dict[str, Any]) -> DraftModelConfig:
    return DraftModelConfig.from_target_config(hf_view(facts), draft_vocab, taps, overrides)


SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "vocab_size",
              "draft_vocab_size", "target_hidden_size")


def quirks(facts: dict[str, Any], trust_remote_code: bool) -> list[str]:
    out = []
    if experts(facts):
        kinds = mlp_kinds(facts)
        out.append(f"MoE: {experts(facts)} routed experts, top-{facts.get('num_experts_per_tok')}, "
                   f"{kinds.count('moe')} of {len(kinds)} layers sparse")
    if is_mla(facts):
        out.append(f"multi-head latent attention (kv_lora_rank {facts['kv_lora_rank']})")
    if linear_layers(facts):
        out.append(f"hybrid: linear-attention layers {linear_layers(facts)} must not be tapped")
    types = {str(t) for t in facts.get("layer_types") or []}
    if facts.get("sliding_window") and ({"sliding_attention"} & types or not types):
        out.append(f"sliding-window attention (window {facts['sliding_window']}); the draft layer attends fully")
    if "chunked_attention" in types:
        out.append(f"chunked attention (chunk {facts.get('attention_chunk_size')}) and NoPE layers; the draft "
                   "layer attends fully with RoPE")
    rope = facts.get("rope_scaling") or facts.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        out.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))}: copied to the draft")
    if facts.get("partial_rotary_factor"):
        out.append(f"partial rotary ({facts['partial_rotary_factor']}): the draft rotates whole heads")
    if facts.get("tie_word_embeddings"):
        out.append("tied embeddings: the teacher head is the embedding matrix; the draft's lm_head is its own")
    if facts.get("final_logit_softcapping"):
        out.append(f"final logit softcapping {facts['final_logit_softcapping']}: applied to the teacher")
    if facts.get("quant_method"):
        out.append(f"checkpoint weights in {facts['quant_method']}")
    if trust_remote_code:
        out.append(f"model_type {facts.get('model_type')} is not in transformers: trust_remote_code")
    return out


def gpu_plan(nbytes: float) -> tuple[int, str]:
    """(tensor-parallel size, hardware) that serves, or captures features from, a target: its weights plus
    room for the KV cache on 80 GB GPUs, else 141 GB, else nodes. Training is sized by `train_plan`."""
    need = nbytes * HEADROOM / 1e9
    for n in (1, 2, 4, 8):
        if need <= n * GPU_GB:
            return n, f"{n}x 80 GB (H100)"
    if need <= 8 * BIG_GPU_GB:
        return 8, "8x 141 GB (H200)"
    nodes = math.ceil(need / (8 * GPU_GB))
    return 8 * nodes, f"{nodes} nodes x 8x 80 GB (H100)"


@dataclass(frozen=True)
class TrainPlan:
    """Where a recipe trains: the first of TRAIN_SETTINGS whose predicted peak fits, and why."""

    online: bool
    checkpoint: bool
    gpus: str
    peak_gib: float
    why: str


def train_plan(run: RunConfig, meta: dict[str, Any]) -> TrainPlan:
    """Each setting of TRAIN_SETTINGS applied to the recipe (`run`, its `recipe:` section `meta`) and sized by
    memory_model at the recipe's own micro-batch, until one leaves the model's uncounted share of the GPU free;
    the same model as the README's memory table, so the hardware lines cannot disagree with it."""
    tried = []
    for gpu, online, checkpoint in TRAIN_SETTINGS:
        trial = copy.deepcopy(run)
        trial.features.store = None if online else f"stores/{slug_of(meta['target'])}"
        trial.train.gradient_checkpointing = checkpoint
        cfg, train = recipe_settings(trial, meta)
        peak = recipe_memory(cfg, train)["peak_bytes"]
        tried.append(f"{'online' if online else 'offline'}{' checkpointed' if checkpoint else ''} {peak / GIB:.1f} "
                     f"{'<=' if fits(peak, gpu) else '>'} {usable_gib(gpu):.1f} GiB usable on {gpu}")
        if fits(peak, gpu):
            why = f"memory_model, micro-batches of {train['batch']} x {train['seq_len']} tokens: " + "; ".join(tried)
            return TrainPlan(online, checkpoint, f"1x {gpu}", round(peak / GIB, 1), why)
    raise ConfigError(f"the draft fits no single GPU ({'; '.join(tried)}); a recipe names one GPU: shard it by hand "
                      "(train.fsdp) or lower train.tokens_per_batch")


def slug_of(target: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", target.split("/")[-1].lower()).strip("-")


def serve_commands(target: str, draft_dir: str, tp: int, trust: bool) -> dict[str, str]:
    """The same chain both engines verify (3 draft steps, top-1), as the exported README writes it."""
    spec = json.dumps({"method": "eagle3", "model": draft_dir, "num_speculative_tokens": 3})
    remote = " --trust-remote-code" if trust else ""
    nodes = max(1, tp // 8)
    multi_sglang = f" --nnodes {nodes} --node-rank $RANK --dist-init-addr $HEAD:5000" if nodes > 1 else ""
    tp_vllm = f" --tensor-parallel-size {min(tp, 8)}" + (f" --pipeline-parallel-size {nodes}" if nodes > 1 else "")
    return {
        "sglang": (f"python -m sglang.launch_server --model-path {target} --tp {tp}{multi_sglang}{remote} "
                   f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {draft_dir} "
                   "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4"),
        "vllm": f"vllm serve {target}{tp_vllm if tp > 1 else ''}{remote} --speculative-config '{spec}'",
    }


def training_note(run: dict[str, Any]) -> str:
    t, d = run["train"], run["data"]
    return (f"TTT {t['ttt_steps']} steps; token-budget micro-batches of {t['tokens_per_batch']} tokens x grad_accum "
            f"{t['grad_accum']} ({t['tokens_per_batch'] * t['grad_accum'] // 1024}k tokens per optimizer step) at "
            f"max_length {d['max_length']}; AdamW lr {t['lr']:g}, {t['warmup_steps']} warmup steps, cosine to 0.1x "
            f"over {t['epochs']} epochs; {t['precision']} autocast"
            + ("; gradient checkpointing of the unrolled steps" if t.get("gradient_checkpointing") else ""))


def build_recipe(raw: dict[str, Any], target: str, draft_vocab: int | None = None) -> dict[str, Any]:
    """A complete recipe (run sections + `recipe:`) for a target from its config.json."""
    facts = target_facts(raw)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in facts]
    if missing:
        raise ConfigError(f"config has no {missing}: not a decoder LM config")
    slug, trust = slug_of(target), not known_model_type(str(facts.get("model_type")))
    hidden, vocab = int(facts["hidden_size"]), int(facts["vocab_size"])
    taps, taps_why = choose_taps(facts)
    overrides, reasons = draft_overrides(facts)
    draft_vocab = min(draft_vocab or DRAFT_VOCAB, vocab)
    draft = derive_draft(facts, taps, draft_vocab, overrides)
    total, routed = estimate_params(facts)
    weights_gb = weight_bytes(facts, total, routed) / 1e9
    serve_tp, serve_hw = gpu_plan(weights_gb * 1e9)
    shape = {k: getattr(draft, k) for k in SHAPE_KEYS}
    per_token = (3 + 1) * hidden * 2  # aux taps + final hidden state, bf16
    draft_dir = f"drafts/{slug}-eagle3"
    run: dict[str, Any] = {
        "data": {"sources": [f"data/{slug}/regenerated.jsonl"], "max_rows": ROWS[True], "max_length": 2048,
                 "eval_fraction": 0.01},
        "target": {"path": target, "aux_layers": taps, "dtype": "bfloat16", "trust_remote_code": trust},
        "draft": {"draft_vocab_size": draft_vocab, "overrides": overrides},
        "train": {"out_dir": f"runs/{slug}", "ttt_steps": 7, "precision": "bf16", "lr": 1.0e-4,
                  "warmup_steps": 100, "epochs": 3, "tokens_per_batch": 16384, "grad_accum": 4,
                  "eval_every": 500, "save_every": 500},
    }
    plan = train_plan(run_config(run, target), {"target": target, "draft": {"shape": shape},
                                                "taps": {"hf_hidden_states": taps},
                                                "hardware": {"target_weights_gb": round(weights_gb, 1)}})
    online, rows = plan.online, ROWS[plan.online]
    tokens = rows * TOKENS_PER_CONVERSATION
    run["data"]["max_rows"] = rows
    if plan.checkpoint:
        run["train"]["gradient_checkpointing"] = True
    if not online:
        run["features"] = {"store": f"stores/{slug}", "store_dtype": "bf16"}
    mode = (f"online: the target ({weights_gb:.0f} GB) fits one 80 GB GPU next to the draft" if online else
            f"offline: the target ({weights_gb:.0f} GB) does not fit next to the draft; `draftforge capture` runs it "
            f"once ({serve_hw}), training then reads the store and loads only embedding + lm_head")
    recipe = {
        "target": target,
        "family": facts.get("model_type"),
        "sources": [f"config.json of {target}"],
        "chat_template": CHAT_NOTES.get(str(facts.get("model_type")), DEFAULT_CHAT_NOTE),
        "target_config": facts,
        "params_b": float(f"{total / 1e9:.4g}"),
        "quirks": quirks(facts, trust),
        "taps": {"hf_hidden_states": taps, "sglang_layer_ids": [i - 1 for i in taps], "why": taps_why},
        "draft": {
            "shape": shape,
            "overrides_why": reasons,
            "vocab_why": (f"{draft_vocab} most frequent assistant tokens of the regenerated data "
                          f"({'capped at the vocabulary' if draft_vocab == vocab else f'of {vocab}'}); d2t/t2d "
                          "ship with the draft"),
        },
        "data": (f"1. draftforge prepare --input sharegpt --input ultrachat_200k.jsonl --output data/{slug}/"
                 f"conversations.jsonl --max-rows {rows} (ShareGPT V3 ships packaged; UltraChat-200k train_sft "
                 "as JSONL)\n"
                 f"2. serve the target exactly as in production (chat template, system prompt, reasoning setting; "
                 f"{serve_hw}) and regenerate every assistant turn with it: draftforge regenerate --input data/"
                 f"{slug}/conversations.jsonl --output data/{slug}/regenerated.jsonl --server http://HOST:PORT "
                 "--temperature 0 --max-tokens 2048 --resume\n"
                 "3. the run reads data.sources (the regenerated file); check the supervised spans first with "
                 f"draftforge inspect --data data/{slug}/regenerated.jsonl --tokenizer {target}"),
        "training": training_note(run),
        "hardware": {
            "target_weights_gb": round(weights_gb, 1),
            "mode": mode,
            "capture_gpus": serve_hw if not online else None,
            "train_gpus": plan.gpus,
            "train_peak_gib": plan.peak_gib,
            "train_memory": plan.why,
            "serve_gpus": serve_hw,
            "store_bytes_per_token": per_token if not online else None,
            "store_tokens_estimate": tokens if not online else None,
            "store_gb": round(tokens * per_token / 1e9) if not online else None,
        },
        "serve": {
            "export": (f"draftforge export runs/{slug} --format sglang --out {draft_dir} && "
                       f"draftforge export --check {draft_dir} --target TARGET_DIR"),
            **serve_commands(target, draft_dir, serve_tp, trust),
        },
    }
    if online:
        recipe["hardware"] = {k: v for k, v in recipe["hardware"].items() if v is not None}
    return {**run, "recipe": recipe}


# ---- checking recipe files --------------------------------------------------------------------------
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "target": str, "family": str, "sources": list, "chat_template": str, "target_config": dict,
    "params_b": (int, float), "quirks": list, "taps": dict, "draft": dict, "data": str, "training": str,
    "hardware": dict, "serve": dict,
}


def validate_recipe(run: RunConfig, meta: dict[str, Any]) -> list[str]:
    """What is wrong with a recipe: schema, facts vs derived draft shape, legal taps, serving commands."""
    from draftforge.target.hf import check_aux_layers

    if not meta:
        return ["no `recipe:` section: a plain run config, not a target recipe"]
    problems = [f"recipe.{k}: missing or not {t}" for k, t in REQUIRED.items() if not isinstance(meta.get(k), t)]
    if problems:
        return problems
    facts, taps = meta["target_config"], meta["taps"].get("hf_hidden_states")
    if run.target.path != meta["target"]:
        problems.append(f"target.path {run.target.path!r} is not recipe.target {meta['target']!r}")
    if run.target.aux_layers != taps:
        problems.append(f"target.aux_layers {run.target.aux_layers} != recipe.taps.hf_hidden_states {taps}")
    try:
        check_aux_layers(taps, hf_view(facts))
    except (ValueError, TypeError) as e:
        problems.append(f"taps {taps}: {e}")
        return problems
    if meta["taps"].get("sglang_layer_ids") != [i - 1 for i in taps]:
        problems.append("taps.sglang_layer_ids must be hf_hidden_states - 1 (SGLang counts layer outputs)")
    if choose_taps(facts)[0] != taps:
        problems.append(f"taps {taps} differ from the rule's {choose_taps(facts)[0]} (update taps.why and the rule)")
    overrides, reasons = draft_overrides(facts)
    if run.draft.overrides != overrides or set(meta["draft"].get("overrides_why") or {}) != set(reasons):
        problems.append(f"draft.overrides {run.draft.overrides} != the family rule's {overrides} (each with a reason)")
    try:
        draft = derive_draft(facts, taps, run.draft.draft_vocab_size, run.draft.overrides)
    except (ValueError, KeyError, TypeError) as e:
        return problems + [f"draft shape cannot be derived: {e}"]
    shape = meta["draft"].get("shape") or {}
    for key in SHAPE_KEYS:
        if shape.get(key) != getattr(draft, key):
            problems.append(f"draft.shape.{key}={shape.get(key)!r}, the facts give {getattr(draft, key)!r}")
    if draft.max_position_embeddings < int(facts.get("max_position_embeddings") or 0):
        problems.append("the draft's max_position_embeddings is below the target's context")
    total, routed = estimate_params(facts)
    if abs(meta["params_b"] - total / 1e9) > 1e-3 * total / 1e9:
        problems.append(f"params_b {meta['params_b']} != {total / 1e9:.4g} estimated from the facts")
    published = meta.get("published_params_b")
    if published and abs(total / 1e9 - published) > 0.1 * published:
        problems.append(f"the facts give {total / 1e9:.1f}B parameters, the model card {published}B: a fact is off")
    trust = not known_model_type(str(facts.get("model_type")))
    if run.target.trust_remote_code != trust:
        problems.append(f"target.trust_remote_code should be {trust} for model_type {facts.get('model_type')}")
    hw = meta["hardware"]
    if hw.get("store_bytes_per_token") and hw["store_bytes_per_token"] != 8 * int(facts["hidden_size"]):
        problems.append("hardware.store_bytes_per_token must be (3+1) x hidden x 2 (bf16 aux taps + final hidden)")
    weights = weight_bytes(facts, total, routed)
    if hw.get("target_weights_gb") != round(weights / 1e9, 1):
        problems.append(f"hardware.target_weights_gb {hw.get('target_weights_gb')} != {weights / 1e9:.1f} (the facts)")
    try:
        problems += plan_problems(run, hw, train_plan(run, meta))
    except ConfigError as e:
        problems.append(str(e))
    serve = meta["serve"]
    expect = serve_commands(meta["target"], f"drafts/{slug_of(meta['target'])}-eagle3", gpu_plan(weights)[0], trust)
    for engine in ("sglang", "vllm"):
        if serve.get(engine) != expect[engine]:
            problems.append(f"serve.{engine} is not the command for this target: {expect[engine]}")
    return problems


def plan_problems(run: RunConfig, hw: dict[str, Any], plan: TrainPlan) -> list[str]:
    """Where a recipe's mode, checkpointing and training hardware differ from its `train_plan`."""
    problems = []
    if (run.features.store is None) != plan.online:
        problems.append(f"features.store: the memory plan trains {'online' if plan.online else 'offline'} ({plan.why})")
    if run.train.gradient_checkpointing != plan.checkpoint:
        problems.append(f"train.gradient_checkpointing should be {plan.checkpoint} ({plan.why})")
    for key, want in (("train_gpus", plan.gpus), ("train_peak_gib", plan.peak_gib), ("train_memory", plan.why)):
        if hw.get(key) != want:
            problems.append(f"hardware.{key} {hw.get(key)!r} is not the memory plan's {want!r}")
    return problems


# ---- YAML out -------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a recipe is read by people: no &id001 anchors
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


def _list(dumper: yaml.SafeDumper, value: list):
    flat = all(not isinstance(v, (dict, list)) for v in value) and all(not isinstance(v, str) or len(v) < 40
                                                                        for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(list, _list)


def dump_recipe(tree: dict[str, Any], header: str = "") -> str:
    body = yaml.dump(tree, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=118)
    return header + body


# ---- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="TARGET_CONFIG", help="the target's config.json (or its dir)")
    parser.add_argument("--target", help="hub id or path the recipe trains against (default: config _name_or_path)")
    parser.add_argument("--out", help="recipe file to write (default: stdout)")
    parser.add_argument("--draft-vocab-size", type=int, default=None, help=f"default {DRAFT_VOCAB}, capped at vocab")
    parser.add_argument("--check", nargs="+", metavar="RECIPE", help="validate recipe files instead")


def check_file(path: str) -> tuple[str, list[str]]:
    """(what the file is, its problems). recipes/ holds target recipes, validated in full, and plain run
    configs (the SmolLM2 ones: no `recipe:` section), which only have to load as `train --config` loads them."""
    try:
        run, meta = load_recipe(path)
    except ConfigError as e:
        return "config", [str(e)]
    return ("recipe", validate_recipe(run, meta)) if meta else ("run config", [])


def run(args: argparse.Namespace) -> int:
    if args.check:
        bad = 0
        for path in args.check:
            kind, problems = check_file(path)
            bad += bool(problems)
            print(f"{path}: " + (f"ok ({kind})" if not problems else "\n  ".join(["problems:", *problems])))
        return 1 if bad else 0
    if not args.config:
        raise ConfigError("recipe needs TARGET_CONFIG (or --check RECIPE...)")
    raw = read_config(args.config)
    target = args.target or raw.get("_name_or_path") or str(Path(args.config).resolve().parent
                                                             if Path(args.config).is_file() else args.config)
    tree = build_recipe(raw, target, args.draft_vocab_size)
    text = dump_recipe(tree, f"# EAGLE-3 recipe for {target}, written by `draftforge recipe` from its config.json.\n"
                             "# Train: draftforge train --config THIS_FILE (the `recipe:` section is for people).\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0
