"""Training under torchrun (gloo, 2 CPU processes): 2 ranks with grad_accum 1 train exactly as 1 process with
grad_accum 2 (weights and logged metrics), FSDP2 sharding and a tensor-parallel target change nothing but
rounding, a stopped 2-rank run resumes identically, and a checkpoint refuses another world size unless forced.

The runs are shared by the tests (each torchrun launch costs seconds of start-up)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftforge.cli import main
from draftforge.export.formats import export_draft
from draftforge.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from tests.conftest import kill_after_checkpoint

STEPS = 6


def overrides(target: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"target.path={target}", f"data.sources=[{data}]", "target.dtype=float32", "data.max_length=128",
        "data.eval_fraction=0.1", "data.num_workers=1", "draft.draft_vocab_size=2000", "train.precision=fp32",
        "train.ttt_steps=3", "train.tokens_per_batch=512", f"train.max_steps={STEPS}", "train.warmup_steps=2",
        "train.lr=3e-3", "train.save_every=1", "train.keep_last=10", "train.log_every=1",
        f"train.eval_every={STEPS}", "train.threads=1", f"train.out_dir={out}", *extra,
    ]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "draftforge.cli", "train", "--no-progress", *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_target_dir, small_conversations):
    """(root, overrides for an out dir, environment for torchrun) with a cache of this module's own."""
    root = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "DRAFTFORGE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return root, lambda name, *extra: overrides(tiny_target_dir, small_conversations, root / name, *extra), env


def launch(setup, name: str, *extra: str) -> Path:
    root, args, env = setup
    done = subprocess.run(torchrun(*args(name, *extra)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return root / name


@pytest.fixture(scope="module")
def single(setup) -> Path:
    """One process, grad_accum 2: the reference for every 2-rank run."""
    root, args, env = setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRAFTFORGE_CACHE", env["DRAFTFORGE_CACHE"])
        assert main(["train", "--no-progress", *args("single", "train.grad_accum=2")]) == 0
    return root / "single"


@pytest.fixture(scope="module")
def ddp(setup) -> Path:
    return launch(setup, "ddp")


def records(out: Path) -> dict[tuple[int, bool], dict]:
    """Last logged record per (step, is eval), without the wall-clock rate."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("tok_per_s", None)
        found[record["step"], "eval_loss" in record] = record
    return found


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out) / "model.safetensors")


def assert_same_weights(a: Path, b: Path, rtol: float, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype, name
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=name)


def assert_same_metrics(a: Path, b: Path, rel: float) -> None:
    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb) == sorted([(s, False) for s in range(1, STEPS + 1)] + [(STEPS, True)])
    for key, record in ra.items():
        assert set(record) == set(rb[key]), key
        for name, value in record.items():
            assert rb[key][name] == pytest.approx(value, rel=rel, abs=1e-12), (key, name)


def test_two_ranks_train_as_one_process_with_twice_the_accumulation(single, ddp):
    assert_same_weights(single, ddp, rtol=1e-6, atol=1e-7)
    assert load_checkpoint(latest_checkpoint(ddp))[2]["world_size"] == 2


def test_logged_metrics_are_the_single_process_metrics(single, ddp):
    """Rank 0 alone logs, once per step, the sums over both ranks' tokens (train, and the eval split shared out);
    grad_norm would show a gradient scaled by the world size (which Adam alone would hide)."""
    assert len((ddp / "metrics.jsonl").read_text().splitlines()) == STEPS + 1
    assert_same_metrics(single, ddp, rel=1e-6)
    assert records(ddp)[STEPS, True]["eval_supervised"] > 0


def test_fsdp2_trains_as_unsharded_and_checkpoints_alike(setup, single, ddp, tmp_path):
    fsdp = launch(setup, "fsdp", "train.fsdp=true")
    assert_same_weights(single, fsdp, rtol=1e-5, atol=1e-6)
    assert_same_metrics(single, fsdp, rel=1e-5)
    _, extra_fsdp, _ = load_checkpoint(latest_checkpoint(fsdp))
    _, extra_ddp, _ = load_checkpoint(latest_checkpoint(ddp))
    assert extra_fsdp["optimizer"]["optimizer"]["param_groups"] == extra_ddp["optimizer"]["optimizer"]["param_groups"]
    assert sorted(extra_fsdp["optimizer"]["optimizer"]["state"]) == sorted(extra_ddp["optimizer"]["optimizer"]["state"])
    exports = [export_draft(run, "sglang", tmp_path / run.name, dtype="float32") for run in (fsdp, ddp)]
    assert (exports[0] / "config.json").read_text() == (exports[1] / "config.json").read_text()
    a, b = (load_file(e / "model.safetensors") for e in exports)
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}


def test_stopped_two_rank_run_resumes_identically(setup, ddp):
    """A 2-rank run stopped after step 2 (its run dir as a kill right after that save leaves it) resumes on 2 ranks
    and ends bit-identical to the uninterrupted run."""
    root, _, _ = setup
    stopped = root / "stopped"
    shutil.copytree(ddp, stopped)
    for ckpt in list_checkpoints(stopped)[2:]:
        shutil.rmtree(ckpt)
    (stopped / "checkpoints" / "step_00000003.tmp").mkdir()  # a save the kill interrupted
    log = stopped / "metrics.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] <= 3))
    shutil.rmtree(stopped / "tensorboard", ignore_errors=True)

    launch(setup, "stopped")
    assert records(stopped) == records(ddp)  # steps 3..6 logged again, exactly
    assert_same_weights(stopped, ddp, rtol=0, atol=0)
    assert not list((stopped / "checkpoints").glob("*.tmp"))


def test_sigkilled_two_rank_run_resumes_identically(setup, ddp):
    """torchrun and both ranks SIGKILLed mid-run (after a save, maybe inside the next one); the same command
    resumes on 2 ranks and ends bit-identical to the uninterrupted run."""
    root, args, env = setup
    out = root / "killed"
    assert kill_after_checkpoint(torchrun(*args("killed")), env, out, step=2) < STEPS, "finished before the kill"

    launch(setup, "killed")
    assert records(out) == records(ddp)
    assert_same_weights(out, ddp, rtol=0, atol=0)


def test_resume_under_another_world_size_needs_force(setup, ddp, tmp_path, capsys):
    root, args, env = setup
    out = tmp_path / "ddp"
    shutil.copytree(ddp, out)
    argv = ["train", "--no-progress", *args("unused"), f"train.out_dir={out}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRAFTFORGE_CACHE", env["DRAFTFORGE_CACHE"])
        with pytest.raises(SystemExit, match=r"world size: 2 -> 1 ranks \(an optimizer step trains on 2 -> 1"):
            main(argv)
        capsys.readouterr()
        assert main([*argv, f"train.max_steps={STEPS + 1}", "--force"]) == 0
    assert "resuming anyway" in capsys.readouterr().err
    _, _, state = load_checkpoint(latest_checkpoint(out))
    assert (state["step"], state["world_size"], state["micro"]) == (STEPS + 1, 1, 2 * STEPS + 1)


def test_tensor_parallel_target_gives_the_replicas_features(setup, ddp):
    """transformers' tp_plan="auto" over both ranks (gloo): each rank's batch goes through the sharded target."""
    tp = launch(setup, "tp", "train.target_tp=true")
    ra, rb = records(ddp), records(tp)
    first = ra[1, False]
    assert rb[1, False] == pytest.approx(first, rel=1e-5)  # the first step's loss and gradient: the same features
    for key, record in ra.items():
        assert rb[key]["loss" if not key[1] else "eval_loss"] == pytest.approx(
            record["loss" if not key[1] else "eval_loss"], rel=1e-5)
    assert_same_weights(ddp, tp, rtol=0, atol=1e-3)


def test_targets_are_the_rows_the_unroll_supervises():
    """Batch.targets (from masks alone) counts every row ttt_forward supervises when all teacher argmaxes are
    draft tokens, so the global normaliser needs no forward."""
    from draftforge.data.batch import Batch
    from draftforge.draft.config import DraftModelConfig
    from draftforge.draft.model import Eagle3Draft
    from draftforge.train.ttt import ttt_forward

    g = torch.Generator().manual_seed(0)
    cfg = DraftModelConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           intermediate_size=64, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                           max_position_embeddings=256, vocab_size=64, draft_vocab_size=64, target_hidden_size=32,
                           aux_layer_ids=[1, 2, 3])
    draft = Eagle3Draft(cfg)
    lengths = [11, 7, 3]
    ids = torch.randint(0, 64, (3, 11), generator=g)
    attn = (torch.arange(11)[None] < torch.tensor(lengths)[:, None]).long()
    loss = (torch.rand(3, 11, generator=g) < 0.6).long() * attn
    batch = Batch(torch.arange(3), ids, attn, loss)
    out = ttt_forward(draft, ids, attn, loss, torch.randn(3, 11, 96, generator=g), torch.randn(3, 11, 32, generator=g),
                      torch.randn(64, 32, generator=g), steps=4)
    assert torch.equal(batch.step_counts(4), out.count)
    assert out.count[0] > out.count[3] > 0


def test_a_step_is_the_mean_over_all_its_targets(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    """Accumulation splits a step's batch without reweighting it: two micro-batches give the gradient of their
    union as one batch (means per micro-batch would weight their targets differently)."""
    from draftforge.config import load_config
    from draftforge.data.batch import collate
    from draftforge.train.setup import build_training

    def trainer(accum: int):
        return build_training(load_config(None, overrides(tiny_target_dir, small_conversations, tmp_path / str(accum),
                                                          f"train.grad_accum={accum}")))

    split, whole = trainer(2), trainer(1)
    pair = split._epoch_batches(0)[:2]
    first, second = (collate(split.train_set, p).step_counts(3) for p in pair)
    assert not torch.equal(first, second), "micro-batches with equal counts would not tell the difference"
    whole._positions = lambda number: pair[0] + pair[1]
    a, b = split.train_step(), whole.train_step()
    assert a["supervised"] == b["supervised"] > 0
    for key in ("loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
