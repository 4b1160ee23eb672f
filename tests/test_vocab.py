"""Draft vocabulary selection exactly as docs/design.md §4.1 says, its file format, cache and command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from draftforge.cli import main
from draftforge.config import DataConfig
from draftforge.data import vocab as vocab_module
from draftforge.data.tokenized import build_tokenized
from draftforge.data.vocab import build_vocab, cached_vocab, load_vocab, save_vocab, select_vocab

MALFORMED = Path(__file__).parent / "fixtures" / "data" / "malformed.jsonl"
COUNTS = np.array([0, 5, 3, 5, 0, 1, 0, 0, 2, 0])  # id -> supervised count; 16 in all


def test_most_frequent_sorted_with_offsets():
    vocab = select_vocab(COUNTS, 3)
    assert vocab.target_ids.tolist() == [1, 2, 3]  # counts 5, 3, 5
    assert vocab.d2t.dtype == torch.int64 and vocab.d2t.tolist() == [1, 1, 1]
    assert vocab.t2d.dtype == torch.bool and vocab.t2d.tolist() == [i in (1, 2, 3) for i in range(10)]
    assert vocab.coverage == pytest.approx(13 / 16)
    logits = torch.arange(10.0) * 10
    assert logits[vocab.t2d].tolist() == [10.0, 20.0, 30.0]  # draft ids in order


def test_ties_go_to_the_smaller_id():
    assert select_vocab(COUNTS, 1).target_ids.tolist() == [1]  # ids 1 and 3 both seen 5 times
    assert select_vocab(COUNTS, 4).target_ids.tolist() == [1, 2, 3, 8]


def test_padding_with_the_smallest_unseen_ids():
    vocab = select_vocab(COUNTS, 7)  # five ids seen (1, 2, 3, 5, 8); pad with unseen 0 and 4
    assert vocab.target_ids.tolist() == [0, 1, 2, 3, 4, 5, 8]
    assert vocab.d2t.tolist() == [0, 0, 0, 0, 0, 0, 2]
    assert vocab.coverage == 1.0 and int(vocab.t2d.sum()) == 7


def test_invalid_sizes():
    with pytest.raises(ValueError):
        select_vocab(COUNTS, 11)
    with pytest.raises(ValueError, match="no supervised tokens"):
        select_vocab(np.zeros(10, np.int64), 3)


def test_only_supervised_positions_count():
    # id 7 is everywhere but never supervised; id 2 is supervised twice, id 4 once
    samples = [
        {"input_ids": torch.tensor([7, 7, 2, 7]), "loss_mask": torch.tensor([0, 0, 1, 0])},
        {"input_ids": torch.tensor([7, 4, 2]), "loss_mask": torch.tensor([0, 1, 1])},
    ]
    vocab = build_vocab(samples, 10, 2)
    assert vocab.target_ids.tolist() == [2, 4] and vocab.coverage == 1.0
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        build_vocab(samples, 4, 2)  # id 4 is supervised


@pytest.fixture(scope="module")
def dataset(smollm2_tokenizer, tmp_path_factory):
    rows = [{"id": str(i), "conversations": [{"role": "user", "content": f"Say {i} twice."},
                                             {"role": "assistant", "content": f"{i} {i}, as asked."}]}
            for i in range(12)]
    return build_tokenized(DataConfig(num_workers=1), smollm2_tokenizer, "smollm2", rows,
                           cache_root=tmp_path_factory.mktemp("tok"), progress=False)


def test_flat_dataset_path_equals_per_sample_path(dataset):
    by_flat = build_vocab(dataset, 49152, 20)
    by_samples = build_vocab([dataset[i] for i in range(len(dataset))], 49152, 20)
    assert torch.equal(by_flat.d2t, by_samples.d2t) and by_flat.coverage == by_samples.coverage
    assert 2 in by_flat.target_ids.tolist()  # <|im_end|> ends every answer


def test_save_load_roundtrip(tmp_path):
    vocab = select_vocab(COUNTS, 3)
    save_vocab(tmp_path / "v.safetensors", vocab)
    loaded = load_vocab(tmp_path / "v.safetensors")
    assert torch.equal(loaded.d2t, vocab.d2t) and torch.equal(loaded.t2d, vocab.t2d)
    assert loaded.d2t.dtype == torch.int64 and loaded.t2d.dtype == torch.bool and loaded.coverage == vocab.coverage


def test_cache_keyed_by_dataset_and_sizes(dataset, tmp_path, monkeypatch):
    first = cached_vocab(dataset, 49152, 20, cache_root=tmp_path)
    monkeypatch.setattr(vocab_module, "build_vocab", lambda *a: pytest.fail("built again"))
    assert torch.equal(cached_vocab(dataset, 49152, 20, cache_root=tmp_path).d2t, first.d2t)
    with pytest.raises(pytest.fail.Exception):
        cached_vocab(dataset, 49152, 21, cache_root=tmp_path)


def test_vocab_command(isolated_cache, tmp_path, capsys):
    out = tmp_path / "vocab.safetensors"
    assert main(["vocab", "--data", str(MALFORMED), "--tokenizer", "smollm2", "--draft-vocab-size", "8",
                 "--output", str(out), "--num-workers", "1"]) == 0
    printed = capsys.readouterr().out
    vocab = load_vocab(out)
    assert vocab.d2t.shape == (8,) and vocab.t2d.shape == (49152,) and int(vocab.t2d.sum()) == 8
    # two samples, "hello<|im_end|>" and "a<|im_end|>": four supervised tokens, all of them covered
    assert "cover 100.00% of 4 supervised tokens in 2 samples" in printed
    assert any((isolated_cache / "tokenized").iterdir())
