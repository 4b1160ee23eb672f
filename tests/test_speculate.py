"""The built-in speculative decoder: greedy equality, lossless sampling, and the exported-dir loader.

Greedy equality is the correctness contract (docs/design.md §7). A random draft exercises the rejection
paths; an "oracle" draft that knows the target's greedy continuation (and is wrong on purpose at
some positions, or right only at rank 2) exercises multi-token acceptance, the tree walk through
non-first children, and the KV-cache gather / crop after partial acceptance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from draftforge.decode.draft_dir import load_decoder, load_draft_dir
from draftforge.decode.eagle3 import SpeculativeDecoder
from draftforge.decode.plain import plain_generate
from draftforge.decode.spec import SpecConfig, SpecStats
from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import Eagle3Draft
from draftforge.export.formats import export_draft

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_config, tiny_model  # noqa: E402

CHAIN, TREE, WIDE = SpecConfig(1, 3, 1, 4), SpecConfig(1, 4, 3, 8), SpecConfig(3, 3, 2, 6)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_draft(target, draft_vocab: int | None = None, seed: int = 1, dtype=torch.float64, cls=Eagle3Draft, **kw):
    """A random draft for `target`; a random sorted draft vocabulary when draft_vocab < vocab."""
    cfg = DraftModelConfig.from_target_config(target.config, draft_vocab_size=draft_vocab or target.config.vocab_size)
    torch.manual_seed(seed)
    draft = cls(cfg, **kw)
    v, dv = cfg.vocab_size, cfg.draft_vocab_size
    ids = torch.sort(torch.randperm(v)[:dv]).values
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_mapping(ids - torch.arange(dv), t2d)
    draft.load_target_embedding(target.get_input_embeddings().weight.detach().float())
    return draft.to(dtype).eval()


class OracleDraft(Eagle3Draft):
    """Cheats: proposes the target's greedy next token, looked up by (position, input token).

    The real layer still runs (its KV cache is what the decoder manages); the pre-norm output is
    overwritten with (position, input token) so `logits` can look the answer up. At positions
    t % 5 == 2 the right token is only rank 2, at t % 7 == 5 it is not proposed at all.
    """

    def __init__(self, cfg: DraftModelConfig, table: dict[tuple[int, int], int]) -> None:
        super().__init__(cfg)
        self.table = table
        self.noise = torch.randn(cfg.draft_vocab_size, generator=torch.Generator().manual_seed(0))

    def step(self, input_ids, hidden, position_ids, past_kv=None, attn_mask=None):
        pre, kv = super().step(input_ids, hidden, position_ids, past_kv, attn_mask)
        pre = pre.clone()
        pre[..., 0] = position_ids.to(pre.dtype)
        pre[..., 1] = input_ids.to(pre.dtype)
        return pre, kv

    def logits(self, prenorm):
        flat = prenorm.reshape(-1, prenorm.shape[-1])
        out = self.noise.to(prenorm.dtype).repeat(flat.shape[0], 1)
        for i, (t, tok) in enumerate(flat[:, :2].round().long().tolist()):
            nxt = self.table.get((t, tok))
            if nxt is None:
                continue
            if t % 7 == 5:
                out[i, nxt] = -10.0
            elif t % 5 == 2:
                out[i, nxt], out[i, (nxt + 1) % out.shape[1]] = 8.0, 10.0
            else:
                out[i, nxt] = 10.0
        return out.view(*prenorm.shape[:-1], -1)


def oracle_for(target, prompts, refs, dtype=torch.float64) -> OracleDraft:
    table = {}
    for p, r in zip(prompts, refs, strict=True):
        seq = list(p) + list(r)
        for t in range(len(seq) - 2):
            table[(t, seq[t + 1])] = seq[t + 2]
    draft = random_draft(target, dtype=dtype, cls=OracleDraft, table=table)
    draft.d2t.zero_()  # identity vocabulary: every token can be proposed
    draft.t2d.fill_(True)
    return draft


PROMPTS = [[5, 7, 9, 11, 13], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], list(range(20, 78))]  # the last crosses a 64 window


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mistral"])
def test_greedy_equality_random_draft(family):
    target = tiny_model(family, dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 24)
    dec = SpeculativeDecoder(target, random_draft(target, draft_vocab=300))
    for spec in (CHAIN, TREE):
        for p, r in zip(PROMPTS[:2], refs[:2], strict=True):
            assert dec.generate([p], spec, 24).tokens == [r], (family, spec)
    assert dec.generate(PROMPTS, WIDE, 24).tokens == refs  # ragged batch, one row past the sliding window


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_greedy_equality_oracle_draft(family):
    target = tiny_model(family, dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 32)
    dec = SpeculativeDecoder(target, oracle_for(target, PROMPTS, refs))
    taus = {}
    for spec in (CHAIN, TREE, SpecConfig(1, 5, 1, 4)):  # a chain cut below its steps
        outs = [dec.generate([p], spec, 32) for p in PROMPTS]
        assert [o.tokens[0] for o in outs] == refs, (family, spec)
        accepted = sum((o.stats.accepted for o in outs), [])
        taus[spec.key] = (sum(accepted) + len(accepted)) / len(accepted)
        assert max(accepted) == spec.draft_tokens - 1 or spec.topk > 1  # whole chains accepted
        assert min(accepted) < max(accepted)  # and partial ones (KV gather / crop exercised)
    assert taus[CHAIN.key] > 2.0
    assert taus[TREE.key] > taus[CHAIN.key]  # rank-2 answers are rescued by the tree
    out = dec.generate(PROMPTS, WIDE, 32)  # batch: rows accept different lengths every cycle
    assert out.tokens == refs
    assert out.stats.tau > 2.0


def test_matches_hf_generate_and_stops_at_eos():
    target = tiny_model("llama", dtype=torch.float64)
    prompt = PROMPTS[1]
    hf = target.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = hf[0, len(prompt) :].tolist()
    dec = SpeculativeDecoder(target, oracle_for(target, [prompt], [ref]))
    assert dec.generate([prompt], TREE, 20).tokens == [ref]
    eos = ref[9]  # stop at the first occurrence of this token, eos included
    cut = ref[: ref.index(eos) + 1]
    assert plain_generate(target, [prompt], 20, eos_token_ids=[eos]) == [cut]
    assert dec.generate([prompt], CHAIN, 20, eos_token_ids=[eos]).tokens == [cut]
    assert dec.generate([prompt], CHAIN, 7).tokens == [ref[:7]]  # max_new_tokens cuts inside a cycle


def test_draft_levels_match_the_training_unroll():
    """Inference drafting = the TTT unroll (docs/design.md §5.1) at the last index: same tokens, RoPE
    positions, hidden states and attention (step-0 keys <= t plus the diagonal of later steps)."""
    from draftforge.draft.attention import ttt_attention

    target = tiny_model("llama", dtype=torch.float64)
    draft = random_draft(target, draft_vocab=300)
    dec = SpeculativeDecoder(target, draft)
    prompt, steps = PROMPTS[1], 4
    seen: list[torch.Tensor] = []
    logits = draft.logits
    draft.logits = lambda pre: (seen.append(pre.reshape(-1, pre.shape[-1])[:1]), logits(pre))[1]
    st, first = dec._prefill([prompt], 0.0, None)
    tree = dec._draft(st, SpecConfig(1, steps, 1, steps + 1), 0.0, None)
    del draft.logits
    y = torch.tensor([prompt + [int(first)] + tree.tokens[0, 1:].tolist()])  # x[0..P] + drafted tokens
    P = len(prompt)
    with torch.no_grad():
        aux = torch.cat([h for i, h in enumerate(target(y[:, :P], output_hidden_states=True).hidden_states)
                         if i in draft.config.aux_layer_ids], dim=-1)  # fmt: skip
        h, ks, vs = draft.project(aux), [], []
        for k in range(steps):  # step k at index t sees embed(y[t+1+k]) at RoPE position t+k
            cos, sin = draft.rotary(torch.arange(P)[None] + k)
            q, kk, vv = draft.midlayer.qkv(draft.embed_tokens(y[:, 1 + k : 1 + k + P]), h, cos, sin)
            ks.append(kk)
            vs.append(vv)
            h = draft.midlayer.finish(h, ttt_attention(q, ks, vs, impl="reference"))
            torch.testing.assert_close(seen[k], h[:, -1], rtol=1e-9, atol=1e-9)


def test_caches_after_cycles_equal_a_fresh_prefill():
    """After partial acceptance (tree paths, ragged batch with holes) both caches hold exactly the
    committed context: the draft's last hidden state and KV equal those of a fresh prefill of it."""
    target = tiny_model("llama", dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 40)
    dec = SpeculativeDecoder(target, oracle_for(target, PROMPTS, refs))
    st, first = dec._prefill(PROMPTS, 0.0, None)
    stats = SpecStats(TREE.steps)
    new = [[int(t)] for t in first]
    for _ in range(4):
        for row, toks in zip(new, dec._cycle(st, TREE, 0.0, None, stats), strict=True):
            row += toks.tolist()
    assert min(stats.accepted) < max(stats.accepted)  # rows grew by different amounts: holes
    for b, prompt in enumerate(PROMPTS):
        fresh, last = dec._prefill([prompt + new[b][:-1]], 0.0, None)
        assert int(last) == new[b][-1] == int(st.last[b])
        slots = st.valid[b].nonzero()[:, 0]
        assert torch.equal(st.pos[b, slots], fresh.pos[0])
        torch.testing.assert_close(st.hidden[b], fresh.hidden[0])
        for mine, ref in zip(st.dkv, fresh.dkv, strict=True):
            torch.testing.assert_close(mine[b][:, slots], ref[0])
        for layer, ref_layer in zip(st.cache.layers, fresh.cache.layers, strict=True):
            torch.testing.assert_close(layer.keys[b][:, slots], ref_layer.keys[0])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_chains_match_the_reference_decoder(family, monkeypatch):
    """Greedy chains emit the tokens of decode/reference.py (no cache, full forwards) and accept the same
    count every cycle; a rule that accepts one token too few still emits the right tokens (the bonus is
    then the draft's token), so only the counts catch it, as the end shows."""
    from draftforge.decode import eagle3, reference

    target = tiny_model(family, dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 32)
    oracle = oracle_for(target, PROMPTS, refs)
    cases = [(oracle, k, p) for k in (1, 3, 5) for p in PROMPTS] + [(random_draft(target), 3, p) for p in PROMPTS]
    seen = []
    for draft, k, prompt in cases:
        tokens, accepted = reference.generate(target, draft, prompt, k, 32)
        out = SpeculativeDecoder(target, draft).generate([prompt], SpecConfig(1, k, 1, k + 1), 32)
        assert out.tokens == [tokens] and out.stats.accepted == accepted, (family, k, prompt)
        seen += accepted if draft is oracle else []
    assert tokens == refs[-1] and min(seen) == 0 and max(seen) >= 3  # rejections, partial and whole chains

    walk = eagle3.walk_tree

    def one_short(tokens, parent, depth, y):
        path, n, _ = walk(tokens, parent, depth, y)
        n = (n - 1).clamp(min=0)
        return path, n, y.gather(1, path.gather(1, n[:, None]))[:, 0]

    monkeypatch.setattr(eagle3, "walk_tree", one_short)
    out = SpeculativeDecoder(target, oracle).generate([PROMPTS[2]], SpecConfig(1, 3, 1, 4), 32)
    tokens, accepted = reference.generate(target, oracle, PROMPTS[2], 3, 32)
    assert out.tokens == [tokens] and out.stats.accepted != accepted


# ---- sampling ------------------------------------------------------------------------------------------


def _small_vocab_target(vocab: int = 8):
    cfg = tiny_config("llama")
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # entropy ~1 nat: several tokens matter
    return model


def _exact_joint(model, prompt, temperature: float, n: int = 3) -> torch.Tensor:
    """P(x1..xn) of the target's sampling at `temperature`, by enumeration."""
    v = model.config.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(v)] * (n - 1)).view(-1, n - 1)
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, len(prompt) - 1 :] / temperature, -1)
    joint = logp[:, 0].gather(1, seqs[:, :1]).squeeze(1)
    for j in range(1, n - 1):
        joint = joint + logp[:, j].gather(1, seqs[:, j : j + 1]).squeeze(1)
    joint = joint[:, None] + logp[:, n - 1]
    return joint.exp().view(*[v] * n)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, probs = counts.flatten().double(), probs.flatten().double()
    exp = probs * counts.sum()
    big = exp >= 5
    obs_c = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_c = torch.cat([exp[big], exp[~big].sum()[None]])
    chi2 = ((obs_c - exp_c) ** 2 / exp_c.clamp(min=1e-12)).sum()
    df = len(obs_c) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), chi2 / 2))


@pytest.mark.parametrize("spec", [SpecConfig(1, 3, 1, 4), SpecConfig(1, 3, 2, 5)], ids=["chain", "tree"])
def test_sampling_is_lossless(spec, monkeypatch):
    """The first three sampled tokens follow the target's exact joint distribution (chi-square)."""
    target = _small_vocab_target()
    draft = random_draft(target, draft_vocab=6, seed=3)
    with torch.no_grad():
        draft.lm_head.weight.mul_(8.0)  # a draft that is right ~40 % of the time
    prompt, temp, n = [1, 2, 3, 4, 5], 1.0, 3000
    exact = _exact_joint(target, prompt, temp)
    dec = SpeculativeDecoder(target, draft)

    def sample_counts() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1234)
        out = dec.generate([prompt] * n, spec, 3, temperature=temp, generator=gen)
        counts = torch.zeros_like(exact)
        for toks in out.tokens:
            counts[tuple(toks)] += 1
        return counts, out.stats

    counts, stats = sample_counts()
    assert 1.0 < stats.tau  # drafts were accepted, so the rejection rule did the work
    assert _chi2_pvalue(counts, exact) > 1e-3

    if spec.topk == 1:  # the test has power: accepting every draft token is caught
        def accept_all(self, tree, logits, temperature, gen):
            B, T = tree.tokens.shape
            p = torch.softmax(logits[:, -1].float() / temperature, -1)
            return torch.arange(T).expand(B, T), torch.full((B,), T - 1), torch.multinomial(p, 1, generator=gen)[:, 0]

        monkeypatch.setattr(SpeculativeDecoder, "_accept", accept_all)
        bad, _ = sample_counts()
        assert _chi2_pvalue(bad, exact) < 1e-6


# ---- loading an exported directory ------------------------------------------------------------------------


def fake_checkpoint(path: Path, draft: Eagle3Draft, target_name: str = "tiny") -> Path:
    """The layout export_draft reads: weights without the embedding + trainer_state.json."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in draft.state_dict().items() if k != "embed_tokens.weight"}
    save_file(state, path / "model.safetensors")
    state_json = {"draft_config": draft.config.to_dict(), "identity": {"target": target_name}}
    (path / "trainer_state.json").write_text(json.dumps(state_json))
    return path


@pytest.mark.parametrize("fmt", ["sglang", "speculators"])
def test_loader_reads_export(tmp_path, fmt):
    target = tiny_model("llama")  # llama3 rope scaling: must survive the round trip
    draft = random_draft(target, draft_vocab=200, dtype=torch.float32)
    with torch.no_grad():
        draft.midlayer.input_layernorm.weight.uniform_(0.5, 1.5)
    draft.config.aux_layer_ids = [1, 3, 5]
    out = export_draft(fake_checkpoint(tmp_path / "ckpt", draft), fmt, tmp_path / fmt, dtype="float32")
    loaded = load_draft_dir(out, target)
    assert loaded.config.aux_layer_ids == [1, 3, 5]
    assert loaded.config.rope_scaling == draft.config.rope_scaling
    assert loaded.config.rope_theta == draft.config.rope_theta
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[3, 8, 1, 9]])
    aux = torch.randn(1, 4, 3 * target.config.hidden_size)
    pos = torch.arange(4)[None]
    a = draft.logits(draft.step(ids, draft.project(aux), pos)[0])
    b = loaded.logits(loaded.step(ids, loaded.project(aux), pos)[0])
    assert torch.equal(a, b)
    assert type(load_decoder(out, target)) is SpeculativeDecoder  # the family dispatch eval and benchmarks use


def test_loader_aux_fallback_and_mismatch(tmp_path):
    target = tiny_model("llama")
    draft = random_draft(target, draft_vocab=200, dtype=torch.float32)
    out = export_draft(fake_checkpoint(tmp_path / "ckpt", draft), "sglang", tmp_path / "x", dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["eagle_aux_hidden_state_layer_ids"]  # only SGLang's "output of layer i" ids left
    (out / "config.json").write_text(json.dumps(cfg))
    assert load_draft_dir(out, target).config.aux_layer_ids == draft.config.aux_layer_ids
    with pytest.raises(ValueError, match="target hidden"):
        load_draft_dir(out, _small_vocab_target())  # vocab 8, not 512


# ---- the real target -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftforge.assets import smollm2_dir

    path = smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_smollm2_greedy_equality(smollm2, tmp_path):
    """fp32 SmolLM2: a random exported draft (loader path) and the oracle, chain and tree."""
    model, tok = smollm2
    from draftforge.eval.suites import Conversation, render

    prompts = [render(tok, Conversation(turns=[q])) for q in ("What is the capital of France?", "Write a haiku.")]
    refs = plain_generate(model, prompts, 20)
    draft = random_draft(model, draft_vocab=4000, dtype=torch.float32)
    out = export_draft(fake_checkpoint(tmp_path / "ckpt", draft), "sglang", tmp_path / "export", dtype="bfloat16")
    dec = SpeculativeDecoder(model, load_draft_dir(out, model))
    assert dec.generate(prompts[:1], CHAIN, 20).tokens == refs[:1]
    oracle = SpeculativeDecoder(model, oracle_for(model, prompts, refs, dtype=torch.float32))
    for spec in (CHAIN, SpecConfig(2, 3, 2, 6)):
        res = oracle.generate(prompts, spec, 20)
        assert res.tokens == refs, spec
        assert res.stats.tau > 2.0


@pytest.mark.slow
def test_eval_cli_writes_json_chart_and_table(smollm2, tmp_path, capsys):
    import argparse

    from draftforge.eval import command

    model, _ = smollm2
    draft = random_draft(model, draft_vocab=4000, dtype=torch.float32)
    out = export_draft(fake_checkpoint(tmp_path / "ckpt", draft), "sglang", tmp_path / "export", dtype="bfloat16")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi."}) + "\n" + json.dumps({"prompt": "Count to three."}) + "\n")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([
        "--draft", str(out), "--target", "smollm2", "--suite", f"jsonl:{prompts}", "--configs", "1,2,1,3", "2,2,2,4",
        "--max-new-tokens", "6", "--out", str(tmp_path / "res.json"), "--no-progress", "--threads", "1",
    ])  # fmt: skip
    assert command.run(args) == 0
    res = json.loads((tmp_path / "res.json").read_text())["results"]["p"]
    assert set(res) == {"1,2,1,3", "2,2,2,4"}
    for r in res.values():
        assert r["num_prompts"] == 2 and r["greedy_match"] == 1.0
        assert r["accept_length"] >= 1.0 and len(r["acceptance"]) == 2
        assert r["throughput"] > 0 and r["plain_throughput"] > 0 and r["speedup"] > 0
    assert (tmp_path / "res.png").stat().st_size > 1000
    assert "speedup" in capsys.readouterr().out
