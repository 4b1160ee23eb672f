"""The built-in decoder with a DFlash block draft: greedy equality, lossless sampling, the drafted block
equal to the training computation, caches equal to a fresh prefill, and the exported-dir loader.

A random draft exercises rejection; an "oracle" block draft that knows the target's greedy
continuation (and is wrong on purpose at some positions) exercises multi-token acceptance, partial
acceptance and the cache gather after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from draftforge.decode.dflash import BlockDecoder
from draftforge.decode.draft_dir import load_decoder, load_dflash_dir
from draftforge.decode.plain import plain_generate
from draftforge.decode.spec import SpecConfig, SpecStats
from draftforge.draft.dflash import DFlashDraft
from draftforge.draft.dflash_config import DFlashConfig
from draftforge.export.formats import check_draft_dir, export_draft

sys.path.insert(0, str(Path(__file__).parent))
from test_speculate import PROMPTS, _chi2_pvalue, _exact_joint, _small_vocab_target  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

CHAIN, FULL = SpecConfig(1, 3, 1, 4), SpecConfig(1, 5, 1, 6)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_block_draft(target, vocab: int | None = None, seed: int = 1, dtype=torch.float64, cls=DFlashDraft,
                       layers: int = 2, **kw) -> DFlashDraft:
    cfg = DFlashConfig.from_target_config(target.config, mask_token_id=3, block_size=6, num_layers=layers,
                                          draft_vocab_size=vocab)
    torch.manual_seed(seed)
    draft = cls(cfg, **kw)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    if vocab:
        ids = torch.sort(torch.randperm(cfg.vocab_size)[:vocab]).values
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        draft.set_vocab_mapping(ids - torch.arange(vocab), t2d)
    draft.load_target_embedding(target.get_input_embeddings().weight.detach().float())
    draft = draft.to(dtype).eval()
    draft.load_target_head(target.get_output_embeddings().weight.detach())
    return draft


class OracleBlockDraft(DFlashDraft):
    """Cheats: block position j proposes the target's greedy token at the block's start + j, looked up by
    (start position, start token). The real layers still run; their output is overwritten with
    (start, token, j). Positions p with p % 7 == 5 get a wrong proposal."""

    def __init__(self, cfg: DFlashConfig, table: dict[tuple[int, int], list[int]]) -> None:
        super().__init__(cfg)
        self.table = table

    def blocks(self, ids, positions, ctx_kv, ctx_mask):
        out = super().blocks(ids, positions, ctx_kv, ctx_mask).clone()
        out[..., 0] = positions[..., :1].to(out.dtype)
        out[..., 1] = ids[..., :1].to(out.dtype)
        out[..., 2] = torch.arange(ids.shape[-1], dtype=out.dtype)
        return out

    def logits(self, prenorm):
        flat = prenorm.reshape(-1, prenorm.shape[-1])
        out = torch.zeros(flat.shape[0], self.config.vocab_size, dtype=prenorm.dtype)
        for i, (p, tok, j) in enumerate(flat[:, :3].round().long().tolist()):
            seq = self.table.get((p, tok))
            if seq is not None and p + j < len(seq):
                want = seq[p + j]
                out[i, want if (p + j) % 7 != 5 else (want + 1) % out.shape[1]] = 10.0
        return out.view(*prenorm.shape[:-1], -1)


def oracle_for(target, prompts, refs) -> OracleBlockDraft:
    table = {}
    for p, r in zip(prompts, refs, strict=True):
        seq = list(p) + list(r)
        for t in range(len(seq)):
            table[(t, seq[t])] = seq
    return random_block_draft(target, cls=OracleBlockDraft, table=table)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mistral"])
def test_greedy_equality_random_draft(family):
    target = tiny_model(family, dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 24)
    dec = BlockDecoder(target, random_block_draft(target, vocab=300))
    for spec in (CHAIN, FULL):
        for p, r in zip(PROMPTS[:2], refs[:2], strict=True):
            assert dec.generate([p], spec, 24).tokens == [r], (family, spec)
    assert dec.generate(PROMPTS, SpecConfig(3, 3, 1, 4), 24).tokens == refs  # ragged batch, past the window


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_equality_oracle_draft(family):
    target = tiny_model(family, dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 32)
    dec = BlockDecoder(target, oracle_for(target, PROMPTS, refs))
    outs = [dec.generate([p], FULL, 32) for p in PROMPTS]
    assert [o.tokens[0] for o in outs] == refs
    accepted = sum((o.stats.accepted for o in outs), [])
    assert max(accepted) == 5 and min(accepted) < 5  # whole blocks and partial ones
    assert (sum(accepted) + len(accepted)) / len(accepted) > 2.5
    out = dec.generate(PROMPTS, SpecConfig(3, 5, 1, 6), 32)  # rows accept different lengths every cycle
    assert out.tokens == refs and out.stats.tau > 2.5
    with pytest.raises(ValueError, match="chain"):
        dec.generate(PROMPTS[:1], SpecConfig(1, 6, 1, 7), 8)  # longer than the trained block


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("vocab", [None, 300])
def test_float32_head_runs_packed(vocab):
    """Decoding in float32, the draft's logits go through its head's packed forward (decode/packed.py),
    the target's lm_head for a full vocabulary: each row's logits independent of the rows beside it,
    close to F.linear's, greedy equality kept; outside decoding the head is a plain linear again."""
    target = tiny_model("llama", dtype=torch.float32)
    refs = plain_generate(target, PROMPTS, 24)
    draft = random_block_draft(target, vocab=vocab, dtype=torch.float32)
    head, logits, seen = draft.head(), draft.logits, []

    def spy(pre):
        packed = vars(head)["forward"]  # KeyError when decoding did not pack the head
        assert vocab is None or "forward" not in vars(draft.shared_head)  # unused: not packed
        calls = []
        head.forward = lambda x: (calls.append(len(x)), packed(x))[1]
        out = logits(pre)
        flat = pre.reshape(-1, pre.shape[-1])
        rows = torch.cat([logits(flat[i : i + 1]) for i in range(len(flat))])
        head.forward = packed
        assert calls, "the logits did not go through the head's packed forward"
        seen.append((out.reshape(rows.shape), rows, F.linear(draft.norm(flat), head.weight)))
        return out

    draft.logits = spy
    dec = BlockDecoder(target, draft)
    assert [dec.generate([p], CHAIN, 24).tokens[0] for p in PROMPTS] == refs
    assert dec.generate(PROMPTS, CHAIN, 24).tokens == refs
    del draft.logits
    assert seen and "forward" not in vars(head)
    for out, rows, ref in seen:
        assert torch.equal(out, rows)
        torch.testing.assert_close(out, ref)


def test_drafted_block_is_the_training_computation():
    """The first block the decoder drafts = `blocks` over the target's taps of the whole sequence with
    the training mask (context before the anchor), anchor = the first generated token."""
    target = tiny_model("llama", dtype=torch.float64)
    draft = random_block_draft(target)
    dec = BlockDecoder(target, draft)
    prompt = PROMPTS[1]
    seen = []
    logits = draft.logits
    draft.logits = lambda pre: (seen.append(pre), logits(pre))[1]
    st, first = dec._prefill([prompt], 0.0, None)
    dec._draft(st, FULL, 0.0, None)
    del draft.logits
    y = torch.tensor([prompt + [int(first)]])
    P = len(prompt)
    with torch.no_grad():
        hs = target(y, output_hidden_states=True).hidden_states
        aux = torch.cat([hs[i] for i in draft.config.aux_layer_ids], dim=-1)
        kv = draft.context_kv(draft.context(aux), torch.arange(P + 1)[None])
        mask = (torch.arange(P + 1) < P)[None, None]
        ref = draft.blocks(draft.block_ids(y[:, P:]), (P + torch.arange(6))[None, None], kv, mask)
    torch.testing.assert_close(seen[0][0], ref[0, 0, 1:], rtol=1e-9, atol=1e-9)


def test_caches_after_cycles_equal_a_fresh_prefill():
    target = tiny_model("llama", dtype=torch.float64)
    refs = plain_generate(target, PROMPTS, 40)
    dec = BlockDecoder(target, oracle_for(target, PROMPTS, refs))
    st, first = dec._prefill(PROMPTS, 0.0, None)
    stats = SpecStats(FULL.steps)
    new = [[int(t)] for t in first]
    for _ in range(4):
        for row, toks in zip(new, dec._cycle(st, FULL, 0.0, None, stats), strict=True):
            row += toks.tolist()
    assert min(stats.accepted) < max(stats.accepted)  # rows grew by different amounts: holes
    for b, prompt in enumerate(PROMPTS):
        fresh, last = dec._prefill([prompt + new[b][:-1]], 0.0, None)
        assert int(last) == new[b][-1] == int(st.last[b])
        slots = st.valid[b].nonzero()[:, 0]
        assert torch.equal(st.pos[b, slots], fresh.pos[0])
        torch.testing.assert_close(st.ctx_k[b][:, :, slots], fresh.ctx_k[0])
        torch.testing.assert_close(st.ctx_v[b][:, :, slots], fresh.ctx_v[0])
        for layer, ref_layer in zip(st.cache.layers, fresh.cache.layers, strict=True):
            torch.testing.assert_close(layer.keys[b][:, slots], ref_layer.keys[0])


def test_sampling_is_lossless(monkeypatch):
    """The first three sampled tokens follow the target's exact joint distribution (chi-square)."""
    target = _small_vocab_target()
    draft = random_block_draft(target, vocab=6, seed=3, layers=1)
    with torch.no_grad():
        draft.lm_head.weight.mul_(8.0)  # a draft that is right a fair share of the time
    prompt, temp, n = [1, 2, 3, 4, 5], 1.0, 3000
    exact = _exact_joint(target, prompt, temp)
    dec = BlockDecoder(target, draft)

    def sample_counts():
        out = dec.generate([prompt] * n, CHAIN, 3, temperature=temp, generator=torch.Generator().manual_seed(7))
        counts = torch.zeros_like(exact)
        for toks in out.tokens:
            counts[tuple(toks)] += 1
        return counts, out.stats

    counts, stats = sample_counts()
    assert stats.tau > 1.2
    assert _chi2_pvalue(counts, exact) > 1e-3

    def accept_all(self, tree, logits, temperature, gen):  # the test has power: a wrong rule is caught
        B, T = tree.tokens.shape
        p = torch.softmax(logits[:, -1].float() / temperature, -1)
        return torch.arange(T).expand(B, T), torch.full((B,), T - 1), torch.multinomial(p, 1, generator=gen)[:, 0]

    monkeypatch.setattr(BlockDecoder, "_accept", accept_all)
    bad, _ = sample_counts()
    assert _chi2_pvalue(bad, exact) < 1e-6


# ---- the exported directory ------------------------------------------------------------------------------


def fake_checkpoint(path: Path, draft: DFlashDraft, target_name: str = "tiny") -> Path:
    """The layout export_draft reads: weights without the embedding + trainer_state.json."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in draft.state_dict().items() if k != "embed_tokens.weight"},
              path / "model.safetensors")
    (path / "trainer_state.json").write_text(json.dumps({"draft_config": draft.config.to_dict(),
                                                         "identity": {"target": target_name}}))
    return path


@pytest.mark.parametrize("vocab", [None, 200])
def test_export_round_trip_same_logits(tmp_path, vocab):
    target = tiny_model("llama")  # llama3 RoPE scaling must survive the round trip
    draft = random_block_draft(target, vocab=vocab, dtype=torch.float32)
    out = export_draft(fake_checkpoint(tmp_path / "ckpt", draft), "vllm", tmp_path / "out", dtype="float32")
    assert check_draft_dir(out, target.config.to_dict()) == []
    loaded = load_dflash_dir(out, target)
    assert loaded.config == draft.config
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(0, 512, (2, 1, 6))
    pos = torch.arange(6).expand(2, 1, 6) + 9
    aux = torch.randn(2, 9, 3 * 64)
    mask = torch.ones(2, 1, 9, dtype=torch.bool)

    def logits(d: DFlashDraft) -> torch.Tensor:
        with torch.no_grad():
            return d.logits(d.blocks(ids, pos, d.context_kv(d.context(aux), torch.arange(9)[None]), mask))

    assert torch.equal(logits(draft), logits(loaded))
    dec = BlockDecoder(target, loaded)  # and it decodes exactly
    assert type(load_decoder(out, target)) is BlockDecoder  # the family dispatch eval and benchmarks use
    assert dec.generate(PROMPTS[:2], CHAIN, 12).tokens == plain_generate(target, PROMPTS[:2], 12)
