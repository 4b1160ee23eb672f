"""One decoder config over one prompt suite: plain and speculative decoding side by side (τ, α_k,
tokens/s, speedup, greedy match), n-gram prompt lookup's τ on the same prompts, and the share of the
answers' tokens the draft vocabulary holds (a token outside it is never accepted); `warm_up` first."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from draftforge.decode.eagle3 import SpeculativeDecoder
from draftforge.decode.plain import eos_ids, plain_generate
from draftforge.decode.spec import SpecConfig, SpecStats
from draftforge.eval.ngram import NGRAM, LookupStats


def warm_up(decoder: SpeculativeDecoder, tokenizer: Any) -> None:
    """A few tokens of both decoders, so first-call overheads stay out of the timings."""
    warm = tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
    decoder.generate([warm], SpecConfig(1, 2, 1, 3), 4)
    plain_generate(decoder.target.model, [warm], 4)


def evaluate_suite(
    decoder: SpeculativeDecoder,
    tokenizer: Any,
    conversations: Sequence[Any],
    spec: SpecConfig,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
    baseline: bool = True,
    ngram: tuple[int, int] = NGRAM,
) -> dict[str, Any]:
    """Plain and speculative decoding of every turn, interleaved prompt by prompt in this process
    (so both see the same machine load); `baseline=False` skips plain decoding (no speedup then).
    At temperature 0 the result also holds n-gram prompt lookup's τ on the same prompts (`ngram` =
    its min and max n, drafting as many tokens as the draft's steps): the free baseline to beat.

    Multi-turn conversations ask turn i after the model's own (speculative) answers to turns < i.
    """
    from tqdm import tqdm

    from draftforge.eval.suites import render

    model = decoder.target.model
    eos = eos_ids(tokenizer, model)
    gen = torch.Generator(device=decoder.target.device).manual_seed(seed)
    stats = SpecStats(steps=spec.steps)
    lookup = LookupStats(spec.steps, *ngram) if temperature <= 0 else None
    plain_s = spec_s = 0.0
    plain_tok = spec_tok = prompts_done = matches = in_vocab = 0
    draft_ids = decoder.draft_ids.cpu()
    latencies: list[float] = []
    total = sum(len(c.turns) for c in conversations)
    bar = tqdm(total=total, desc=desc or spec.key, unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(conversations), spec.batch):
        group = list(conversations[start : start + spec.batch])
        answers: list[list[str]] = [[] for _ in group]
        for turn in range(max(len(c.turns) for c in group)):
            idx = [i for i, c in enumerate(group) if turn < len(c.turns)]
            prompts = [render(tokenizer, group[i], answers[i]) for i in idx]
            t0 = time.perf_counter()
            plain = plain_generate(model, prompts, max_new_tokens, temperature, eos, gen) if baseline else None
            t1 = time.perf_counter()
            out = decoder.generate(prompts, spec, max_new_tokens, temperature, eos, gen)
            t2 = time.perf_counter()
            plain_s, spec_s = plain_s + t1 - t0, spec_s + t2 - t1
            spec_tok += sum(map(len, out.tokens))
            if plain is not None:
                plain_tok += sum(map(len, plain))
                matches += sum(a == b for a, b in zip(plain, out.tokens, strict=True))
            latencies.append(t2 - t1)
            stats.merge(out.stats)
            for i, prompt, toks in zip(idx, prompts, out.tokens, strict=True):
                answers[i].append(tokenizer.decode(toks, skip_special_tokens=True))
                in_vocab += int(torch.isin(torch.tensor(toks, dtype=torch.long), draft_ids).sum())
                if lookup is not None:
                    lookup.add(prompt, toks)
            prompts_done += len(idx)
            bar.update(len(idx))
            post = {"tau": f"{stats.tau:.2f}"}
            if baseline:
                post["speedup"] = f"{(spec_tok / spec_s) / max(plain_tok / plain_s, 1e-9):.2f}"
            bar.set_postfix(post)
    bar.close()
    spec_tps = spec_tok / max(spec_s, 1e-9)
    plain_tps = plain_tok / max(plain_s, 1e-9) if baseline else None
    return {
        "batch": spec.batch,
        "steps": spec.steps,
        "topk": spec.topk,
        "draft_tokens": spec.draft_tokens,
        "num_prompts": prompts_done,
        "new_tokens": spec_tok,
        "vocab_coverage": in_vocab / max(1, spec_tok),  # of the answers' tokens, those the draft can propose
        "cycles": stats.cycles,
        "accept_length": stats.tau if stats.cycles else 1.0,
        "acceptance": [None if math.isnan(a) else a for a in stats.alpha],
        "position_acceptance": stats.position_rate,
        "throughput": spec_tps,
        "latency": sum(latencies) / max(1, len(latencies)),  # seconds per generate call (one batch of prompts)
        "wall_s": spec_s,  # seconds in speculative generate calls (bench's name for its suite's wall time)
        "plain_new_tokens": plain_tok if baseline else None,
        "plain_wall_s": plain_s if baseline else None,
        "plain_throughput": plain_tps,
        "plain_latency": plain_s / max(1, len(latencies)) if baseline else None,
        "speedup": spec_tps / max(plain_tps, 1e-9) if plain_tps else None,
        "time_split": {"draft_s": stats.draft_s, "verify_s": stats.verify_s, "commit_s": stats.commit_s},
        "greedy_match": matches / max(1, prompts_done) if temperature <= 0 and baseline else None,
        "ngram": lookup.summary() if lookup is not None else None,
    }
