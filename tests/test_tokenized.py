"""The tokenised dataset cache: contents equal per-sample tokenisation, the key covers every input, reuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from draftforge.config import DataConfig
from draftforge.data import tokenized
from draftforge.data.template import tokenize_row
from draftforge.data.tokenized import TokenizedDataset, build_tokenized

MALFORMED = Path(__file__).parent / "fixtures" / "data" / "malformed.jsonl"


def make_rows(n: int) -> list[dict]:
    rows = [{"id": f"r{i}", "conversations": [
        {"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}." + " Indeed." * (i % 5)},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]} for i in range(n)]
    rows.append({"id": "too-long", "conversations": [{"role": "user", "content": "word " * 300},
                                                     {"role": "assistant", "content": "ok"}]})
    return rows


@pytest.fixture(scope="module")
def built(smollm2_tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = DataConfig(max_length=128, num_workers=2)
    rows = make_rows(40)  # enough rows for the process pool
    return cfg, rows, cache, build_tokenized(cfg, smollm2_tokenizer, "smollm2", rows, cache_root=cache,
                                             progress=False)


def test_samples_equal_per_row_tokenisation(smollm2_tokenizer, built):
    cfg, rows, _, dataset = built
    assert len(dataset) == 40 and dataset.ids == [f"r{i}" for i in range(40)]
    for i in (0, 7, 39):
        expected = tokenize_row(smollm2_tokenizer, rows[i], cfg)
        sample = dataset[i]
        assert sample["input_ids"].dtype == torch.long and sample["loss_mask"].dtype == torch.long
        assert sample["input_ids"].tolist() == expected.input_ids
        assert sample["loss_mask"].tolist() == expected.loss_mask
        assert dataset.lengths[i] == len(expected.input_ids)
    assert dataset[-1]["input_ids"].tolist() == dataset[39]["input_ids"].tolist()
    with pytest.raises(IndexError):
        dataset[40]


def test_storage_and_meta(built):
    _, _, _, dataset = built
    arrays = load_file(str(dataset.path / "tokens.safetensors"))
    assert arrays["input_ids"].dtype == np.int32 and arrays["loss_mask"].dtype == np.uint8
    assert arrays["offsets"].dtype == np.int64 and arrays["offsets"][-1] == len(arrays["input_ids"])
    meta = dataset.meta
    assert meta["num_samples"] == 40 and meta["rows_in"] == 41
    assert meta["rejected"] == {"truncated_mask": 1}
    assert meta["num_tokens"] == int(dataset.lengths.sum()) and meta["num_supervised"] == int(dataset.loss_mask.sum())
    assert meta["options"]["max_length"] == 128 and meta["tokenizer_id"] == "smollm2"
    (reject,) = [json.loads(line) for line in (dataset.path / "rejects.jsonl").read_text().splitlines()]
    assert reject["id"] == "too-long" and reject["reason"] == "truncated_mask"
    assert [p.name for p in dataset.path.parent.iterdir()] == [dataset.path.name]  # no temporary left behind


def test_second_build_reuses_the_cache(smollm2_tokenizer, built, monkeypatch):
    cfg, rows, cache, dataset = built

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of reusing the cache")

    monkeypatch.setattr(tokenized, "_tokenize_all", fail)
    again = build_tokenized(DataConfig(max_length=128, num_workers=1), smollm2_tokenizer, "smollm2", rows,
                            cache_root=cache)
    assert again.path == dataset.path and again.ids == dataset.ids
    assert np.array_equal(again.input_ids, dataset.input_ids)


@pytest.mark.parametrize("change", ["max_length", "system_prompt", "last_turn_only", "think", "template", "vocab",
                                    "data"])
def test_key_covers_everything_that_changes_samples(smollm2_tokenizer, built, change, monkeypatch):
    cfg, rows, cache, dataset = built
    monkeypatch.setattr(tokenized, "_tokenize_all", lambda rows, *a: [(np.zeros(1, np.int32),
                                                                       np.ones(1, np.uint8), False)] * len(rows))
    cfg = copy.deepcopy(cfg)
    tok = smollm2_tokenizer
    rows = copy.deepcopy(rows)
    if change == "max_length":
        cfg.max_length = 64
    elif change == "system_prompt":
        cfg.system_prompt = "Be brief."
    elif change == "last_turn_only":
        cfg.last_turn_only = True
    elif change == "think":
        cfg.think = "train"
    elif change == "template":
        tok = copy.deepcopy(tok)
        tok.chat_template = tok.chat_template.replace("helpful", "careful")
    elif change == "vocab":
        tok = copy.deepcopy(tok)
        tok.add_tokens(["<new-token>"])
    else:
        rows[3]["conversations"][1]["content"] += "!"
    other = build_tokenized(cfg, tok, "smollm2", rows, cache_root=cache, progress=False)
    assert other.key != dataset.key


def test_key_ignores_workers_and_tokenizer_copies(smollm2_tokenizer, built):
    cfg, rows, _, dataset = built
    assert tokenized.tokenizer_fingerprint(copy.deepcopy(smollm2_tokenizer)) == dataset.meta["tokenizer"]
    assert tokenized.rows_hash(copy.deepcopy(rows)) == dataset.meta["data"]


def test_build_from_raw_files_counts_prepare_rejects(smollm2_tokenizer, tmp_path):
    dataset = build_tokenized(DataConfig(num_workers=1), smollm2_tokenizer, "smollm2", MALFORMED,
                              cache_root=tmp_path, progress=False)
    assert dataset.ids == ["good-1", "repaired"]
    assert sum(dataset.meta["prepare_rejected"].values()) == 12
    assert TokenizedDataset(dataset.path).ids == dataset.ids  # reopens from disk


def test_all_rejected_is_an_error(smollm2_tokenizer, tmp_path):
    rows = make_rows(0)
    with pytest.raises(ValueError, match="no usable samples"):
        build_tokenized(DataConfig(max_length=16), smollm2_tokenizer, "smollm2", rows, cache_root=tmp_path,
                        progress=False)
    assert not any(tmp_path.iterdir())
