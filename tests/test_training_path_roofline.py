"""benchmarks/training_path.py's bound on the target forward: the FLOPs of its linear layers at every
position (padding included), at the GEMM rate measured on those shapes, and online training's bound."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import load_script


def test_forward_roofline_counts_every_linear_at_every_position(tiny_target_dir, monkeypatch):
    import torch
    from torch import nn

    from draftforge.target.hf import HFTarget, decoder

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = load_script("training_path")
    target = HFTarget.from_pretrained(tiny_target_dir, None, torch.float32)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0  # a left-padded row: its padding runs through the linears too
    batch = SimpleNamespace(input_ids=torch.randint(0, 1000, (2, 24)), attention_mask=mask)
    roof = bench.forward_roofline(target, batch)
    params = sum(m.weight.numel() for m in decoder(target.model).modules() if isinstance(m, nn.Linear))
    assert params > 0 and roof["linear_gflop_per_token"] == pytest.approx(2 * params / 1e9)
    assert roof["gemm_gflops"] > 0 and roof["max_tok_s"] == pytest.approx(roof["gemm_gflops"] / (2 * params / 1e9))


def test_online_bound_adds_the_forward_bound_and_the_draft_step_per_token():
    bench = load_script("training_path")
    run = {"forward_roofline": {"linear_gflop_per_token": 0.2, "gemm_gflops": 400.0, "max_tok_s": 2000.0},
           "online": 500.0, "online_draft": 2000.0, "plain_forward_online_batches": 1000.0}
    text = bench.roofline_summary(run)
    assert "no forward exceeds 2,000 tok/s" in text and "(50% of that)" in text
    assert "at most 1,000 tok/s, 2.00x today's 500" in text  # 1 / (1/2000 + 1/2000)
