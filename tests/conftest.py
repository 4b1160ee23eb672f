"""Shared fixtures. The real SmolLM2 tokenizer is loaded once per session (tests copy it to modify it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from draftforge import assets

    return AutoTokenizer.from_pretrained(assets.smollm2_dir())


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """DRAFTFORGE_CACHE in a temporary dir; the (slow to build) SmolLM2 directory still comes from the real cache."""
    from draftforge import assets

    smollm2 = assets.smollm2_dir()
    monkeypatch.setattr(assets, "smollm2_dir", lambda: smollm2)
    monkeypatch.setenv("DRAFTFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's real tokenizer and vocabulary, saved as a plain HF dir."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny_target")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a sharp next-token distribution, like a trained model's, so a draft can learn it
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_conversations(tmp_path_factory):
    """The first 48 usable conversations of the packaged ShareGPT, normalised."""
    from draftforge.data.conversations import prepare

    path = tmp_path_factory.mktemp("data") / "conversations.jsonl"
    prepare(["sharegpt"], path, max_rows=48)
    return path
