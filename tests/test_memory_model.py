"""The training memory model against the code it describes: parameter counts of a real draft, the
saved-for-backward bytes autograd itself reports, linearity in the sequence length, what
checkpointing saves, and one measured step (torch's CPU memory profiler)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from draftforge.draft.config import DraftModelConfig
from draftforge.draft.model import Eagle3Draft
from draftforge.train.memory_model import GIB, measured_peaks, recipe_memory, recipe_shape, training_memory
from draftforge.train.ttt import ttt_forward, ttt_objective

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def shape(**kw) -> DraftModelConfig:
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None, max_position_embeddings=8192, vocab_size=500,
                draft_vocab_size=200, target_hidden_size=48, aux_layer_ids=[1, 2, 3])
    return DraftModelConfig(**(base | kw))


def batch(cfg: DraftModelConfig, L: int) -> tuple[Eagle3Draft, dict]:
    """A draft and random features with every position supervised (the model's upper bound)."""
    g = torch.Generator().manual_seed(0)
    V, Dv, Ht = cfg.vocab_size, cfg.draft_vocab_size, cfg.target_hidden_size
    head = torch.randn(V, Ht, generator=g) * 0.05
    head[:Dv] *= 4  # the teacher's argmax lies in the draft vocabulary (t2d: the first Dv ids)
    return Eagle3Draft(cfg), dict(
        input_ids=torch.randint(0, V, (1, L), generator=g), attention_mask=torch.ones(1, L, dtype=torch.long),
        loss_mask=torch.ones(1, L, dtype=torch.long), aux=torch.randn(1, L, 3 * Ht, generator=g),
        final_hidden=torch.randn(1, L, Ht, generator=g), target_lm_head_weight=head)


@pytest.mark.parametrize("cfg", [
    shape(),
    shape(num_attention_heads=8, num_key_value_heads=8, head_dim=16, target_hidden_size=64),  # MHA, Hq > H
    shape(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, head_dim=32, intermediate_size=256),
])
def test_parameter_counts_are_the_modules(cfg):
    draft = Eagle3Draft(cfg)
    p = training_memory(cfg, 128)["params"]
    assert p["trainable"] == sum(t.numel() for t in draft.parameters() if t.requires_grad)
    assert p["frozen_embedding"] == draft.embed_tokens.weight.numel()
    assert p["lm_head"] == draft.lm_head.weight.numel() and p["fc"] == draft.fc.weight.numel()


@pytest.mark.parametrize("precision,attention,checkpoint",
                         itertools.product(["bf16", "fp32"], ["efficient", "blockwise", "reference"], [False, True]))
def test_saved_tensors_are_what_autograd_saves(precision, attention, checkpoint):
    """Every tensor the model says the forward keeps for backward, by autograd's own saved-tensor
    hooks (unique storages, parameters excluded). The model counts every position as supervised
    and L rows where the code has L + steps or L - 2 - k: within 0.5 % at L = 256."""
    cfg, L, K = shape(), 256, 3
    draft, feats = batch(cfg, L)
    params = {t.untyped_storage().data_ptr() for t in draft.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            ttt_forward(draft, **feats, steps=K, attention=attention, checkpoint=checkpoint)
    measured = sum(n for ptr, n in seen.items() if ptr not in params)
    predicted = training_memory(cfg, L, ttt_steps=K, precision=precision, attention=attention, checkpoint=checkpoint,
                                feature_bytes=4)["saved_tensor_bytes"]
    assert predicted == pytest.approx(measured, rel=5e-3)


@pytest.mark.parametrize("attention", ["efficient", "blockwise"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_linear_in_sequence_length(attention, checkpoint):
    cfg, _ = recipe_shape(RECIPES / "llama-3.1-8b-instruct.yaml")
    m = {L: training_memory(cfg, L, attention=attention, checkpoint=checkpoint) for L in (4096, 8192, 16384, 32768)}
    for moment in m[4096]["phases"]:  # each moment is affine in L; the peak is the largest of them
        peak = {L: r["phases"][moment]["peak"] for L, r in m.items()}
        assert peak[8192] - peak[4096] == (peak[16384] - peak[8192]) // 2 == (peak[32768] - peak[16384]) // 4
    assert m[32768]["peak_bytes"] < 2 * m[16384]["peak_bytes"]
    dense = {L: training_memory(cfg, L, attention="reference")["peak_bytes"] for L in (4096, 8192, 16384)}
    assert dense[16384] - dense[8192] > 3 * (dense[8192] - dense[4096])  # the oracle is quadratic


def test_checkpointing_saves_activations():
    for name in ("llama-3.1-8b-instruct", "llama-3.3-70b-instruct", "qwen3-235b-a22b"):
        cfg, train = recipe_shape(RECIPES / f"{name}.yaml")
        assert train["ttt_steps"] == 7 and train["precision"] == "bf16"
        for L in (2048, 32768):
            off, on = (training_memory(cfg, L, attention="blockwise", checkpoint=ck) for ck in (False, True))
            assert on["per_token"]["saved"] < off["per_token"]["saved"] / 3
            assert on["peak_bytes"] < off["peak_bytes"]


def recipe_peak_gib(name: str, seq_len: int, checkpoint: bool) -> float:
    """A recipe's draft as it trains (its accumulation, feature dtype, online target): TTT 7, bf16, GPU path."""
    return recipe_memory(*recipe_shape(RECIPES / f"{name}.yaml"), seq_len, checkpoint)["peak_bytes"] / GIB


def test_8b_draft_trains_32k_tokens_on_an_80gb_gpu():
    cfg, train = recipe_shape(RECIPES / "llama-3.1-8b-instruct.yaml")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.draft_vocab_size) == (
        4096, 32, 8, 32000)
    assert train["target_weights_bytes"] > 14 * GIB  # the recipe trains online: the target shares the GPU
    assert recipe_peak_gib("llama-3.1-8b-instruct", 32768, checkpoint=True) < 78


def test_readme_memory_table_is_the_model():
    """The README's recipe memory table is what the model says today, not figures kept by hand."""
    readme = (RECIPES.parent / "README.md").read_text().splitlines()
    recipes = {"Llama-3.1-8B": "llama-3.1-8b-instruct", "Llama-3.3-70B": "llama-3.3-70b-instruct",
               "Qwen3-235B-A22B": "qwen3-235b-a22b"}
    for label, name in recipes.items():
        row = next(line for line in readme if line.startswith(f"| {label} "))
        cells = [c.strip().replace("*", "") for c in row.strip(" |").split("|")]
        want = [" / ".join(f"{recipe_peak_gib(name, L, ck):.1f}" for ck in (False, True)) for L in (2048, 8192, 32768)]
        assert cells[2:] == want, label


@pytest.mark.parametrize("checkpoint", [False, True])
def test_predicted_peaks_match_a_measured_step(checkpoint):
    """A real bf16 step (TTT 3, loss, backward, AdamW with state) of a hidden-256 draft: live tensor
    peaks of the forward and the backward from torch's CPU memory profiler, above what was alive
    before the step, within 5 % of the model (measured: 1-3 %)."""
    cfg = shape(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=704,
                vocab_size=8192, draft_vocab_size=2048, target_hidden_size=256)
    L, K = 512, 3
    draft, feats = batch(cfg, L)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ttt_forward(draft, **feats, steps=K, checkpoint=checkpoint)
        ttt_objective(out).backward()
        opt.step()

    measured = measured_peaks(step)
    m = training_memory(cfg, L, ttt_steps=K, checkpoint=checkpoint, feature_bytes=4, head_bytes=4, optimizer="fused")
    # alive before the step: everything static except the head split (the first forward makes it), the features
    before = sum(m["static"].values()) - m["static"]["target_lm_head_split"] + m["per_token"]["inputs"] * L
    for stage in ("forward", "backward"):
        assert m["stages"][stage] - before == pytest.approx(measured[stage], rel=0.05), stage
