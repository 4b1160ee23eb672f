"""benchmarks/decode_speed.py: its rows count the tokens and cycles that decoding really produced, and
derive the cycle cost and speedup from the measured times; the vLLM row comes from bench's entries."""

import json
import sys
from pathlib import Path

import pytest
import torch

from draftforge.decode.draft_dir import load_decoder
from draftforge.decode.plain import eos_ids, plain_generate
from draftforge.decode.spec import SpecConfig
from draftforge.eval.suites import render
from draftforge.export.formats import export_draft

sys.path.insert(0, str(Path(__file__).parent))
from test_speculate import fake_checkpoint, random_draft  # noqa: E402

from tests.conftest import load_script

CHAIN = SpecConfig(1, 3, 1, 4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _module():
    return load_script("decode_speed")


def test_cycle_row_is_the_measured_times_divided():
    row = _module().cycle_row(plain_tokens=100, plain_s=10.0, spec_tokens=100, spec_s=5.0, cycles=40, tau=2.5)
    assert row["plain_step_ms"] == pytest.approx(100.0) and row["cycle_ms"] == pytest.approx(125.0)
    assert row["cycle_cost"] == pytest.approx(1.25) and row["speedup"] == pytest.approx(2.0)
    assert row["plain_tok_s"] == pytest.approx(10.0) and row["spec_tok_s"] == pytest.approx(20.0)


def test_builtin_row_counts_what_decoding_produced(tiny_target_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench = _module()
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    draft = random_draft(model, draft_vocab=4000, dtype=torch.float32)
    out = export_draft(fake_checkpoint(tmp_path / "ckpt", draft), "vllm", tmp_path / "export", dtype="float32")
    decoder = load_decoder(out, model)
    convs = bench.prompts(3)
    assert [len(c.turns) for c in convs] == [1, 1, 1]
    row = bench.builtin(decoder, tokenizer, convs, CHAIN, 12)

    ids = [render(tokenizer, c) for c in convs]
    plain = plain_generate(model, ids, 12, eos_token_ids=eos_ids(tokenizer, model))
    cycles = sum(decoder.generate([p], CHAIN, 12, eos_token_ids=eos_ids(tokenizer, model)).stats.cycles for p in ids)
    assert row["plain_tokens"] == row["spec_tokens"] == sum(map(len, plain)) and row["greedy_match"] == 1.0
    assert row["cycles"] == cycles
    assert row["cycle_cost"] == pytest.approx(row["cycle_ms"] / row["plain_step_ms"])
    assert row["speedup"] == pytest.approx(row["spec_tokens"] / row["cycles"] / row["cycle_cost"])
    assert row["plain_tok_s"] * row["plain_step_ms"] == pytest.approx(1e3)
    assert set(row["time_split_ms"]) == {"draft_s", "verify_s", "commit_s"}


def test_vllm_row_reads_the_plain_and_the_chain_entries_of_bench(monkeypatch):
    from draftforge.eval import bench as eval_bench

    seen = {}

    def launch_and_bench(args, suites):
        seen.update(configs=args.configs, draft=args.draft, engine=args.engine, prompts=suites[0].num_prompts)
        plain = {"new_tokens": 200, "wall_s": 20.0}
        chain = {"new_tokens": 200, "wall_s": 12.0, "cycles": 80, "accept_length": 2.5, "greedy_match": 1.0}
        return {"mtbench": {"1,0,0,0": plain, "1,3,1,4": chain}}, {"commands": {}}

    monkeypatch.setattr(eval_bench, "launch_and_bench", launch_and_bench)
    bench = _module()
    row = bench.vllm("DIR", bench.prompts(2), CHAIN, 64)
    assert seen == {"configs": ["1,0,0,0", "1,3,1,4"], "draft": "DIR", "engine": "vllm-cpu", "prompts": 2}
    assert row["cycle_cost"] == pytest.approx((12.0 / 80) / (20.0 / 200)) and row["tau"] == 2.5
    assert row["speedup"] == pytest.approx(20.0 / 12.0)


def test_a_saved_run_keeps_the_other_labels(tmp_path):
    module, out = _module(), tmp_path / "results" / "decode_speed.json"
    module.save(out, "before", {"builtin": {"plain_tok_s": 1.0}})
    report = module.save(out, "after", {"builtin": {"plain_tok_s": 2.0}})
    assert report == json.loads(out.read_text())
    assert list(report["runs"]) == ["before", "after"]
