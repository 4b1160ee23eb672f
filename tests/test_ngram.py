"""Prompt lookup τ replayed from greedy tokens, against vLLM's proposer rules and a hand count."""

from __future__ import annotations

import pytest

from draftforge.eval.ngram import LookupStats, propose

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_longest_suffix_then_earliest_occurrence():
    ctx = [1, 2, 3, 9, 2, 3, 7, 1, 2, 3]
    assert propose(ctx, 2, 1, 3) == [9, 2]  # [1, 2, 3] occurs at 0: the 3-gram wins over later 2-grams
    assert propose(ctx, 5, 2, 2) == [9, 2, 3, 7, 1]  # [2, 3]: the earliest of its two earlier occurrences
    assert propose([1, 2, 3, 9, 2, 3], 4, 2, 2) == [9, 2, 3]  # fewer than k tokens follow: all of them
    assert propose([5, 6, 7], 3, 1, 3) == []  # no earlier occurrence
    assert propose([4, 4, 4], 2, 1, 3) == [4]  # [4, 4] at 0 overlaps the suffix: allowed, one token follows
    assert propose([4], 2, 1, 3) == []  # context shorter than any n-gram plus one


def test_replay_counts_cycles_like_vllm():
    prompt, output = [1, 2, 3, 4, 1, 2], [3, 4, 1, 2, 3, 8, 8]
    stats = LookupStats(k=3, min_n=1, max_n=2)
    stats.add(prompt, output)
    # prefill emits 3; [2, 3] -> propose [4, 1, 2]: all right, bonus 3; [2, 3] -> [4, 1, 2] vs [8, ...]: 0 right,
    # bonus 8; [8] occurs nowhere earlier: no draft, 8 emitted plainly (not counted)
    assert stats.drafts == 2 and stats.accepted == [1, 1, 1]
    assert stats.tau == pytest.approx(1 + 3 / 2)
    summary = stats.summary()
    assert summary["acceptance"] == [0.5, 1.0, 1.0] and summary["accept_length"] == pytest.approx(2.5)
    # the 6 tokens after prefill took 3 target forwards: 4 + 1 + 1, so 2.0 per forward, below τ's 2.5
    assert (stats.forwards, stats.tokens) == (3, 6) and summary["tokens_per_forward"] == pytest.approx(2.0)


def test_acceptance_past_the_answer_counts_with_a_longer_continuation():
    prompt, output = [1, 2, 3, 4, 1, 2], [3, 4, 1, 2]
    cut = LookupStats(k=3, min_n=1, max_n=2)
    cut.add(prompt, output)  # the draft [4, 1, 2] is checked against the 3 tokens left: all right
    longer = LookupStats(k=3, min_n=1, max_n=2)
    longer.add(prompt, [*output, 3, 4], emitted=len(output))  # same cycles, same drafts
    assert (cut.drafts, cut.accepted, longer.drafts, longer.accepted) == (1, [1, 1, 1], 1, [1, 1, 1])
    short = LookupStats(k=3, min_n=1, max_n=2)
    short.add(prompt, output[:2])  # [4, 1, 2] against [4] alone: one accepted, the rest unknown
    ahead = LookupStats(k=3, min_n=1, max_n=2)
    ahead.add(prompt, output, emitted=2)  # the continuation shows the engine accepting all three
    assert short.accepted == [1, 0, 0] and ahead.accepted == [1, 1, 1]


def test_no_draft_no_cycle():
    stats = LookupStats(k=3, min_n=2, max_n=4)
    stats.add([1, 2, 3], [4, 5, 6])
    assert stats.drafts == 0 and stats.tau == 1.0
    assert (stats.forwards, stats.tokens, stats.per_forward) == (2, 2, 1.0)  # a forward per token after prefill


def test_eval_reports_lookup_tau_and_vocab_coverage_of_the_greedy_answers(tiny_target_dir, smollm2_tokenizer):
    """evaluate_suite's n-gram τ is the replay of plain greedy decoding on the same prompts, and its vocab
    coverage the share of those tokens among the draft's ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from draftforge.decode.eagle3 import SpeculativeDecoder
    from draftforge.decode.plain import eos_ids, plain_generate
    from draftforge.decode.spec import SpecConfig
    from draftforge.eval.evaluate import evaluate_suite
    from draftforge.eval.suites import Conversation, render
    from tests.test_speculate import random_draft

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    decoder = SpeculativeDecoder(model, random_draft(model, 2000, dtype=torch.float32))
    convs = [Conversation(id=str(i), turns=[t]) for i, t in enumerate(["Say hi twice.", "Count to five."])]
    result = evaluate_suite(decoder, smollm2_tokenizer, convs, SpecConfig(1, 3, 1, 4), 24, progress=False,
                            ngram=(1, 3))
    expected = LookupStats(k=3, min_n=1, max_n=3)
    in_vocab = total = 0
    draft_ids = set(decoder.draft_ids.tolist())
    for conv in convs:
        prompt = render(smollm2_tokenizer, conv, [])
        answer = plain_generate(model, [prompt], 24, eos_token_ids=eos_ids(smollm2_tokenizer, model))[0]
        expected.add(prompt, answer)
        in_vocab += sum(t in draft_ids for t in answer)
        total += len(answer)
    assert expected.drafts > 0 and result["greedy_match"] == 1.0
    assert result["ngram"] == expected.summary()
    assert 0 < in_vocab < total and result["vocab_coverage"] == in_vocab / total  # 2,000 of the target's ids
