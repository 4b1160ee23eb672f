"""Shared fixtures. The real SmolLM2 tokenizer is loaded once per session (tests copy it to modify it)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import ModuleType

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


def kill_after_checkpoint(cmd: list[str], env: dict[str, str], out: Path, step: int) -> int:
    """Start a training command, SIGKILL its whole process group once `out` has checkpoint `step`, and return the
    step of the latest checkpoint left (a save may have been cut short after it)."""
    from draftforge.train.checkpoint import latest_checkpoint

    def latest() -> int:
        ckpt = latest_checkpoint(out)
        return -1 if ckpt is None else int(ckpt.name.split("_")[1])

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and latest() < step:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run exited with {proc.returncode} before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return latest()


@pytest.fixture
def one_thread():
    """One intra-op thread (`pytestmark = pytest.mark.usefixtures("one_thread")`): the machine's 2 cores
    are shared, and a second thread only adds contention to small decoding steps."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_script(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (benchmarks/ is scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
