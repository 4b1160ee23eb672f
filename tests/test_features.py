"""Feature store: offline training equals online, capture resumes after SIGKILL and runs on two ranks,
damage is found and repaired, a store made for another setup is refused, 8-bit error is bounded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from draftforge.cli import main
from draftforge.config import load_config
from draftforge.features.store import (
    FeatureStore,
    StoreError,
    bytes_per_token,
    channel_scales,
    decode,
    encode,
    shard_record,
)


def overrides(target: Path, data: Path, store: Path | None = None, *extra: str) -> list[str]:
    return [
        f"target.path={target}", f"data.sources=[{data}]", "target.dtype=float32", "data.max_length=128",
        "data.eval_fraction=0.1", "data.num_workers=1", "draft.draft_vocab_size=2000", "train.precision=fp32",
        "train.ttt_steps=3", "train.tokens_per_batch=512", "train.warmup_steps=2", "train.lr=3e-3",
        "train.eval_every=0", "train.save_every=1000", "train.threads=1", "features.shard_mb=0.5",
        *([f"features.store={store}"] if store else []), *extra,
    ]


def capture(*args: str) -> int:
    return main(["capture", "--no-progress", *args])


def checksums(store: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((store / "manifest.json").read_text())["shards"]]


def train(args: list[str], tmp_path: Path, steps: int = 4):
    """(trainer, [loss, acc_0, grad_norm] per step, eval metrics) as exact JSON text."""
    from draftforge.train.setup import build_training

    trainer = build_training(load_config(None, [*args, f"train.out_dir={tmp_path / 'run'}"]))
    history = [trainer.train_step() for _ in range(steps)]
    return trainer, [json.dumps([m["loss"], m["acc_0"], m["grad_norm"]]) for m in history], trainer.evaluate()


# ---- offline == online ----------------------------------------------------------------------------------


def test_fp32_store_trains_exactly_as_online(tmp_path, tiny_target_dir, small_conversations, isolated_cache,
                                             monkeypatch):
    store = tmp_path / "store"
    assert capture(*overrides(tiny_target_dir, small_conversations, store, "features.store_dtype=fp32")) == 0
    accum = "train.grad_accum=2"  # read-ahead must follow the micro-batches inside a step too
    _, online, online_eval = train(overrides(tiny_target_dir, small_conversations, None, accum), tmp_path / "online")

    from draftforge.target.hf import HFTarget

    def no_full_target(*args, **kwargs):
        raise AssertionError("offline training loaded the full target")

    monkeypatch.setattr(HFTarget, "from_pretrained", no_full_target)
    trainer, offline, offline_eval = train(overrides(tiny_target_dir, small_conversations, store, accum),
                                           tmp_path / "off")
    assert offline == online
    assert offline_eval == online_eval and online_eval["eval_supervised"] > 0
    assert trainer.features.hits == 7, "the background reader did not predict the trainer's 8 micro-batches"


@pytest.mark.parametrize("store_dtype, rtol", [("bf16", 5e-3), ("int8", 3e-2), ("fp8", 3e-2)])
def test_compact_stores_train_close_to_online(store_dtype, rtol, tmp_path, tiny_target_dir, small_conversations,
                                              isolated_cache):
    store = tmp_path / "store"
    assert capture(*overrides(tiny_target_dir, small_conversations, store, f"features.store_dtype={store_dtype}")) == 0
    _, online, _ = train(overrides(tiny_target_dir, small_conversations), tmp_path / "online", steps=3)
    _, offline, _ = train(overrides(tiny_target_dir, small_conversations, store), tmp_path / "off", steps=3)
    for a, b in zip(online, offline, strict=True):
        assert json.loads(b)[0] == pytest.approx(json.loads(a)[0], rel=rtol)


# ---- 8-bit codec --------------------------------------------------------------------------------------


def outlier_features(rows: int = 256, width: int = 3 * 96, seed: int = 0) -> torch.Tensor:
    """Hidden-state-like rows: a few channels 100-1000x the others, one row of massive activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, [5, 100, 201]] *= torch.tensor([100.0, 300.0, 1000.0])
    x[0] *= 50
    return x


@pytest.mark.parametrize("store_dtype", ["int8", "fp8"])
def test_8bit_round_trip_error_is_bounded(store_dtype):
    x = outlier_features()
    channel = channel_scales(x) if store_dtype == "int8" else None
    q, scale = encode(x, store_dtype, 3, channel)
    assert q.element_size() == 1 and scale.shape == (len(x), 3)
    y = decode(q, scale, torch.float32, channel)
    smooth = x if channel is None else x / channel
    err = (y - x) if channel is None else (y - x) / channel
    step = scale.repeat_interleave(x.shape[1] // 3, dim=1)
    if store_dtype == "int8":  # round to nearest: half a step per element
        assert bool((err.abs() <= 0.5 * step * (1 + 1e-5)).all())
    else:  # e4m3: 3 mantissa bits (relative 2^-4), subnormals below 2^-6 (absolute 2^-10)
        assert bool((err.abs() <= torch.maximum(smooth.abs() * 2**-4, step * 2**-10) * (1 + 1e-5)).all())
    rel = (y - x).norm(dim=1) / x.norm(dim=1)
    assert float(rel.mean()) < (0.01 if store_dtype == "int8" else 0.03)
    assert encode(torch.zeros(2, 6), store_dtype, 3)[1].eq(1).all()  # an all-zero row stays finite


def test_8bit_store_halves_disk():
    for hidden in (576, 4096):
        assert bytes_per_token("int8", hidden) / bytes_per_token("bf16", hidden) < 0.51
        assert bytes_per_token("fp8", hidden) == bytes_per_token("int8", hidden)


# ---- capture: resume, ranks, faults -------------------------------------------------------------------


def slow_capture_cmd(args: list[str], delay: float) -> list[str]:
    """`draftforge capture` in a subprocess, each shard write delayed so the test can kill it midway."""
    code = (
        "import sys, time\n"
        "import draftforge.features.capture as c\n"
        "write = c.write_shard\n"
        f"c.write_shard = lambda *a: (time.sleep({delay}), write(*a))[1]\n"
        "from draftforge.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return [sys.executable, "-c", code, "capture", "--no-progress", *args]


def test_capture_resumes_after_sigkill(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert capture(*overrides(tiny_target_dir, small_conversations, straight, "features.shard_mb=0.1")) == 0
    shards = len(checksums(straight))
    assert shards >= 6

    env = {**os.environ, "DRAFTFORGE_CACHE": str(isolated_cache)}
    args = overrides(tiny_target_dir, small_conversations, killed, "features.shard_mb=0.1")
    proc = subprocess.Popen(slow_capture_cmd(args, 0.3), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and sum(shard_record(killed, i) is not None for i in range(shards)) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(shard_record(killed, i) is not None for i in range(shards))
    assert 3 <= done < shards, "the capture finished before it could be killed"
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore(killed)
    (killed / "shards" / ".00001.safetensors.tmp-999999").write_bytes(b"half a shard")  # as a kill mid-write leaves

    resumed = subprocess.run(slow_capture_cmd(args, 0.0), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{shards - done} shards written, {done} already finished" in resumed.stdout
    assert checksums(killed) == checksums(straight)
    assert not list((killed / "shards").glob(".*"))
    manifest = json.loads((killed / "manifest.json").read_text())
    seconds = [s["seconds"] for s in manifest["shards"]]  # the killed run's shards keep what they cost
    assert all(s > 0 for s in seconds) and manifest["capture_seconds"] == pytest.approx(sum(seconds), abs=0.01)


def test_two_ranks_share_the_work(tmp_path, tiny_target_dir, small_conversations, isolated_cache):
    single, double = tmp_path / "single", tmp_path / "double"
    assert capture(*overrides(tiny_target_dir, small_conversations, single)) == 0
    env = {**os.environ, "DRAFTFORGE_CACHE": str(isolated_cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "draftforge.cli", "capture", "--no-progress", *overrides(tiny_target_dir, small_conversations, double)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(rank 0 of 2)" in done.stdout and "(rank 1 of 2)" in done.stdout
    assert "store " + str(double) + ": complete" in done.stdout  # the last rank to finish completed it
    assert checksums(double) == checksums(single)


def test_corrupted_and_truncated_shards_are_found_and_repaired(tmp_path, tiny_target_dir, small_conversations,
                                                                isolated_cache, capsys):
    store = tmp_path / "store"
    args = overrides(tiny_target_dir, small_conversations, store)
    assert capture(*args) == 0
    good = checksums(store)
    flipped, truncated = store / "shards" / "00001.safetensors", store / "shards" / "00002.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))

    env = {**os.environ, "DRAFTFORGE_CACHE": str(isolated_cache)}
    trained = subprocess.run([sys.executable, "-m", "draftforge.cli", "train", "--no-progress", *args,
                              f"train.out_dir={tmp_path / 'run'}", "train.max_steps=20"],
                             env=env, capture_output=True, text=True)
    assert trained.returncode == 2  # the corrupted shard's samples come within a few batches
    assert "00001.safetensors is corrupted" in trained.stderr and "Traceback" not in trained.stderr

    with open(truncated, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError, match="00002.safetensors is truncated"):
        FeatureStore(store)
    capsys.readouterr()
    assert capture(*args, "--verify") == 1
    report = capsys.readouterr().out
    assert "BAD shards/00001.safetensors" in report and "BAD shards/00002.safetensors" in report
    assert "3 of 5 shards good" in report

    assert capture(*args, "--repair") == 0
    assert capture(*args, "--verify") == 0
    assert checksums(store) == good
    _, losses, _ = train(args, tmp_path / "after", steps=2)
    assert all(np.isfinite(json.loads(m)[0]) for m in losses)


def test_store_for_another_setup_is_refused(tmp_path, tiny_target_dir, small_conversations, isolated_cache, capsys):
    from draftforge.train.setup import build_training

    store = tmp_path / "store"
    assert capture(*overrides(tiny_target_dir, small_conversations, store)) == 0

    def refused(*extra: str, target: Path = tiny_target_dir) -> str:
        config = load_config(None, [*overrides(target, small_conversations, store, *extra),
                                    f"train.out_dir={tmp_path / 'run'}"])
        with pytest.raises(StoreError) as e:
            build_training(config)
        return str(e.value)

    assert "tapped layers: store has [2, 3, 3], this run [1, 2, 3]" in refused("target.aux_layers=[1,2,3]")
    assert "tokenised data" in refused("data.max_length=96")

    retemplated = tmp_path / "retemplated"
    shutil.copytree(tiny_target_dir, retemplated)
    template = retemplated / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    message = refused(target=retemplated)
    assert "tokenizer or chat template" in message and "target:" not in message

    other = tmp_path / "other_target"
    shutil.copytree(tiny_target_dir, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    assert "target: captured from" in refused(target=other)

    capsys.readouterr()
    assert capture(*overrides(tiny_target_dir, small_conversations, store, "features.store_dtype=int8")) == 2
    assert "holds a different capture:\n  layout: store has bf16, this config int8" in capsys.readouterr().err
