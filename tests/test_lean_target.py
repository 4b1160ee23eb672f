"""decode/lean_target.py: the lean forward equals HF's forward (logits, taps and cache) for the families it
covers, under the decoders' masks; other families keep HF's; fused linears equal the separate ones."""

import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from draftforge.decode import packed
from draftforge.decode.lean_target import lean_supported
from draftforge.decode.packed import fused_linears, packed_linears
from draftforge.decode.target_runner import TargetRunner, left_pad, slot_cache

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, MORE_FAMILIES, family_config, tiny_model  # noqa: E402

LEAN = ("llama", "qwen2", "qwen3")
PROMPTS = [[5, 9, 33, 7, 101], [17, 3, 250], [44, 2, 8, 91, 6, 12, 71]]


def _prefill_then_tree(runner: TargetRunner, aux: list[int]):
    """A left-padded prefill, then a 4-node tree over the cache (root, two children, a grandchild)."""
    ids, valid, pos, attend = left_pad(PROMPTS, runner.device)
    cache = slot_cache()
    runner.aux_layers = aux
    first = runner.forward(ids, pos, cache, attend, pos)
    B, S = valid.shape
    tree = torch.tensor([[1, 40, 41, 42]]).expand(B, 4)
    depth = torch.tensor([0, 1, 1, 2])
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool).expand(B, 4, 4)
    q_pos = valid.sum(1, keepdim=True) + depth
    second = runner.forward(tree, q_pos, cache, torch.cat([valid[:, None].expand(B, 4, S), anc], 2),
                            torch.cat([pos, q_pos], 1))
    return first, second, cache


@pytest.mark.parametrize("family", LEAN)
def test_lean_forward_equals_hf_under_the_decoders_masks(family):
    model = tiny_model(family, dtype=torch.float64)
    lean, hf = TargetRunner(model, []), TargetRunner(model, [])
    hf.lean = False
    assert lean.lean
    aux = [1, 4, 4]  # a layer tapped twice, as shallow models' default taps do
    with torch.no_grad():
        got, want = _prefill_then_tree(lean, aux), _prefill_then_tree(hf, aux)
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g[0], w[0], rtol=1e-9, atol=1e-9)  # logits
        torch.testing.assert_close(g[1], w[1], rtol=1e-9, atol=1e-9)  # taps
    for g, w in zip(got[2].layers, want[2].layers, strict=True):
        torch.testing.assert_close(g.keys, w.keys, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g.values, w.values, rtol=1e-9, atol=1e-9)


def test_lean_follows_a_changed_weight_and_a_single_query_needs_no_mask():
    model = tiny_model("qwen2", dtype=torch.float64)  # q/k/v with biases
    runner, hf = TargetRunner(model, []), TargetRunner(model, [])
    hf.lean = False
    ids = torch.tensor([PROMPTS[0]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        runner.forward(ids, pos, slot_cache(), None, pos)
        model.model.layers[2].self_attn.k_proj.bias.add_(0.5)
        model.model.layers[3].mlp.up_proj.weight.mul_(2.0)
        caches = slot_cache(), slot_cache()
        outs = [r.forward(ids, pos, c, None, pos)[0] for r, c in zip((runner, hf), caches, strict=True)]
        nxt = torch.tensor([[7]]), pos[:, -1:] + 1
        outs += [r.forward(*nxt, c, None, None)[0] for r, c in zip((runner, hf), caches, strict=True)]
        with pytest.raises(ValueError, match="empty cache"):
            runner.forward(ids, pos, caches[0], None, pos)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[2], outs[3], rtol=1e-9, atol=1e-9)


def test_only_llama_shaped_families_with_full_attention_run_lean():
    models = {f: transformers.AutoModelForCausalLM.from_config(family_config(f)) for f in {**FAMILIES, **MORE_FAMILIES}}
    lean = {f for f, m in models.items() if lean_supported(m)}
    assert lean == set(LEAN)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_fused_linears_equal_the_separate_ones_and_spare_their_packs():
    torch.manual_seed(0)
    owner = nn.ModuleList([nn.Linear(64, 96), nn.Linear(64, 32, bias=False), nn.Linear(64, 32)])
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = torch.cat([m(x) for m in owner], -1)
        with packed_linears(owner):
            got = fused_linears(owner, list(owner))(x)
            assert not any(m in packed._packs._kept for m in owner)  # never called: never packed
            owner[1].weight.mul_(3.0)
            tripled = fused_linears(owner, list(owner))(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tripled, torch.cat([m(x) for m in owner], -1))
