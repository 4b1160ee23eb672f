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
