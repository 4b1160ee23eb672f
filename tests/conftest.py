"""Shared fixtures. The real SmolLM2 tokenizer is loaded once per session (tests copy it to modify it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from draftforge import assets

    return AutoTokenizer.from_pretrained(assets.smollm2_dir())
