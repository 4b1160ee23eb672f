"""What a target gives the trainer, whichever way it was computed (live model or feature store)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The names `target.dtype`, `export --dtype` and `eval --dtype` take.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TargetFeatures:
    """Per-token target features for one batch.

    aux: concat of the three tapped hidden states, [B, L, 3*H_t].
    final_hidden: the last hidden state after the final norm, [B, L, H_t]; the teacher is
    `final_hidden @ lm_head.T` (only draft-vocab rows are ever materialised).
    """

    aux: torch.Tensor
    final_hidden: torch.Tensor


@dataclass
class TargetHead:
    """The target's output projection, enough to turn final_hidden into teacher logits."""

    weight: torch.Tensor  # [V, H_t]
    logit_softcap: float | None = None  # Gemma-2 style tanh capping, applied per logit
    norm_gain: torch.Tensor | None = None  # [H_t] the final norm's gain: weight @ (norm_gain * x / rms(x)) are logits

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if rows is None else self.weight[rows]
        out = hidden @ weight.to(hidden.dtype).T
        if self.logit_softcap:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out

