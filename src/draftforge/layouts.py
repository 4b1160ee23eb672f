"""Which draft family an exported directory holds, read from its config.json the way engines read it.

At the bottom of the package: serving needs it to pick the engine's speculative method, export to
route a directory to its checker, eval to pick a decoder.
"""

from __future__ import annotations

from typing import Any

DFLASH_ARCHITECTURE = "DFlashDraftModel"  # what vLLM's qwen3_dflash loader registers


def is_dflash(config: dict[str, Any]) -> bool:
    """A DFlash draft's config.json (or one that means to be: it has a dflash_config)."""
    return DFLASH_ARCHITECTURE in (config.get("architectures") or []) or "dflash_config" in config
